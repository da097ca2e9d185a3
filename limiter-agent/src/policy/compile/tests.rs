//! Compiler tests: every kind into one plan.
