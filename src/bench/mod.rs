//! `flotilla bench ...`: benchmarks that print JSON lines, each beside a baseline measured in the
//! same run; the last line is `{"summary": {...}}`.

pub mod actors;
pub mod ckpt;
pub mod collectives;
#[cfg(feature = "cuda")]
pub mod nccl;
pub mod pipeline;
pub mod sim;
pub mod step;
#[cfg(feature = "cuda")]
pub mod step_cuda;

use serde_json::Value;

/// The records of one benchmark run.
#[derive(Debug, Default)]
pub struct Report {
    pub records: Vec<Value>,
}

impl Report {
    pub fn push(&mut self, v: Value) {
        self.records.push(v);
    }

    /// Print as JSON lines (`json`) or as a readable table.
    pub fn print(&self, json: bool) {
        for r in &self.records {
            if json {
                println!("{r}");
            } else if let Value::Object(m) = r {
                let fields: Vec<String> = m.iter().map(|(k, v)| format!("{k}={v}")).collect();
                println!("{}", fields.join("  "));
            }
        }
    }
}
