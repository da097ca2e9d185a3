pub mod check;
pub mod run;
pub mod top;
