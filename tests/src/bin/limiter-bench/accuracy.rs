use anyhow::Result;
use serde_json::Value;
pub fn run(_cfg: &crate::Config) -> Result<Value> { anyhow::bail!("todo") }
