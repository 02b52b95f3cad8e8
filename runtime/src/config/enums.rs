//! The string-valued choices of the config (`schedule = "1f1b"`, `device = "cpu"`, ...).
//!
//! Every choice is a plain Rust enum whose TOML spelling is declared once, in the
//! [`string_enum!`] invocation below. The macro derives everything else from that one list:
//! `as_str`, `NAMES` (which the schema walk uses to report "expected one of ..."), `Display`,
//! `FromStr` and the serde impls. So adding a variant is a one-line change here, and the schema,
//! the error messages and the printed default config follow automatically.

use std::fmt;
use std::str::FromStr;

/// Declares a fieldless enum spelled in TOML as lower-case strings.
///
/// `Default` is the variant marked `#[default]`, as with `#[derive(Default)]`.
macro_rules! string_enum {
    (
        $(#[$meta:meta])*
        pub enum $name:ident {
            $( $(#[$vmeta:meta])* $variant:ident = $text:literal, )+
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
        pub enum $name {
            $( $(#[$vmeta])* $variant, )+
        }

        impl $name {
            /// Every variant, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];
            /// The TOML spellings of [`Self::ALL`], in the same order.
            pub const NAMES: &'static [&'static str] = &[$($text),+];

            /// The TOML spelling of this variant.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text,)+
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $name {
            type Err = UnknownVariant;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                match s {
                    $($text => Ok($name::$variant),)+
                    _ => Err(UnknownVariant { found: s.to_owned(), expected: Self::NAMES }),
                }
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(self.as_str())
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let text = <String as serde::Deserialize>::deserialize(deserializer)?;
                text.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

/// A string that is not one of an enum's TOML spellings.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown value {found:?}; expected one of: {}", .expected.join(", "))]
pub struct UnknownVariant {
    /// What the file said.
    pub found: String,
    /// The accepted spellings.
    pub expected: &'static [&'static str],
}

string_enum! {
    /// The pipeline-parallel schedule (`parallel.schedule`).
    pub enum Schedule {
        /// All forwards, then all backwards. Bubble (PP−1)(F+B), highest activation memory.
        GPipe = "gpipe",
        /// One-forward-one-backward. Bubble (PP−1)(F+B); needs `micro_batches >= pp`.
        #[default]
        OneFOneB = "1f1b",
        /// Zero-bubble 1F1B (backward split into input-grad B and weight-grad W).
        /// Bubble (PP−1)(F+B−2W); needs `micro_batches >= pp`.
        Zb1p = "zb1p",
        /// DeepSeek-V3's bidirectional DualPipe: each rank holds stage `i` and stage `pp−1−i`.
        /// Needs an even `pp` and `micro_batches >= 2·pp`.
        DualPipe = "dualpipe",
        /// The "V" variant of DualPipe: the model is cut into `2·pp` chunks, each rank holds two.
        /// Needs `micro_batches >= 2·pp`.
        DualPipeV = "dualpipev",
    }
}

impl Schedule {
    /// How many model chunks a pipeline of `pp` ranks is cut into under this schedule.
    pub fn stages(self, pp: usize) -> usize {
        match self {
            Schedule::DualPipeV => pp.saturating_mul(2),
            _ => pp,
        }
    }
}

string_enum! {
    /// When a rank may start the units of its schedule's action list (`parallel.start_order`).
    /// Either way a forward waits for the forwards before it in the list and for room among the
    /// schedule's peak activations, and a W waits for every unit before it.
    pub enum StartOrder {
        /// A B (input gradient) starts as soon as its gradient has arrived, even before units
        /// that the list puts first and that still wait for their inputs: on a real device,
        /// where phases and messages take varying times, the device does not idle for a late
        /// input while other work is ready.
        #[default]
        Ready = "ready",
        /// Units start in the list's order: the step follows the schedule's own timeline
        /// (`flotilla schedule`) exactly when costs are what the schedule assumed, as on the
        /// simulated device.
        List = "list",
    }
}

string_enum! {
    /// How the GEMMs of a step round their inputs (`model.precision`).
    pub enum Precision {
        /// f32 everywhere.
        #[default]
        Fp32 = "fp32",
        /// GEMM inputs rounded to bf16 on the GPU's tensor cores, f32 accumulation; weights,
        /// activations, gradients and the optimizer stay f32 (CUDA device only).
        Bf16 = "bf16",
    }
}

string_enum! {
    /// Where compute runs (`cluster.device`).
    pub enum DeviceKind {
        /// f32 on the CPU.
        #[default]
        Cpu = "cpu",
        /// One NVIDIA GPU per rank (rank r on GPU r mod the GPUs the driver sees); needs a
        /// binary built with the cargo feature `cuda`.
        Cuda = "cuda",
        /// The cost-model device of the simulated cluster (shapes only, virtual time); needs
        /// `cluster.fabric = "sim"`.
        Sim = "sim",
    }
}

string_enum! {
    /// How bytes move between ranks (`cluster.fabric`).
    pub enum FabricKind {
        /// In-process channels: every rank in this process.
        #[default]
        Inproc = "inproc",
        /// QUIC with mutual TLS between host processes. Not supported yet as a job's fabric:
        /// multi-process jobs do not exist, so validation refuses it.
        Quic = "quic",
        /// Simulated links with latency, bandwidth and contention on virtual time. Not supported
        /// yet as a job's fabric: no command runs the simulated cluster, so validation refuses it.
        Sim = "sim",
    }
}

string_enum! {
    /// Whether a checkpoint blocks training (`checkpoint.mode`).
    pub enum CheckpointMode {
        /// Training waits until the checkpoint is persisted.
        Sync = "sync",
        /// Snapshot in memory, persist in the background (TRANSOM's TCE).
        #[default]
        Async = "async",
    }
}

string_enum! {
    /// How `data.source` is encoded (`data.format`).
    pub enum DataFormat {
        /// UTF-8 text tokenized as bytes (needs `model.vocab_size >= 256`).
        #[default]
        Text = "text",
        /// Pre-tokenized little-endian u16 token ids.
        U16 = "u16",
        /// Pre-tokenized little-endian u32 token ids.
        U32 = "u32",
    }
}

string_enum! {
    /// The learning-rate schedule after warm-up (`optimizer.schedule`).
    pub enum LrSchedule {
        /// Cosine decay from `lr` to `min_lr` over the remaining steps.
        #[default]
        Cosine = "cosine",
        /// Stay at `lr`.
        Constant = "constant",
    }
}

string_enum! {
    /// The RoPE scaling method (`model.rope_scaling.type`). DeepSeek-V3 uses YaRN.
    pub enum RopeScalingKind {
        /// YaRN (arXiv 2309.00071), as in HuggingFace's DeepseekV3.
        #[default]
        Yarn = "yarn",
    }
}
