pub mod check;
pub mod detach;
pub mod explain;
pub mod run;
pub mod top;
