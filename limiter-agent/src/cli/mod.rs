pub mod check;
pub mod explain;
pub mod run;
pub mod top;
