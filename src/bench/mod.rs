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
    /// Print each record as it is pushed, as JSON (`Some(true)`) or `key=value` lines.
    live: Option<bool>,
    /// Records printed so far.
    printed: usize,
}

impl Report {
    /// A report that prints each record as soon as it is pushed, so that a run cut short (a
    /// time limit on a GPU machine) keeps what it measured.
    pub fn live(json: bool) -> Report {
        Report {
            live: Some(json),
            ..Report::default()
        }
    }

    pub fn push(&mut self, v: Value) {
        self.records.push(v);
        if let Some(json) = self.live {
            self.print(json);
        }
    }

    /// Print the records not printed yet, as JSON lines (`json`) or as a readable table.
    pub fn print(&mut self, json: bool) {
        for r in &self.records[self.printed..] {
            if json {
                println!("{r}");
            } else if let Value::Object(m) = r {
                let fields: Vec<String> = m.iter().map(|(k, v)| format!("{k}={v}")).collect();
                println!("{}", fields.join("  "));
            }
        }
        self.printed = self.records.len();
    }
}
