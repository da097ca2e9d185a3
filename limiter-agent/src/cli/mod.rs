pub mod check;
pub mod run;
