//! The comm actor: one rank's communicator backend behind messages. Collective requests
//! (all-reduce, reduce-scatter, all-gather, broadcast, all-to-all(v), barrier) arrive as
//! [`CommMsg`]s and are answered through their `RpcReplyPort`s, in arrival order.
//!
//! The actor owns a worker that owns the backend, and only forwards requests to it, so that it
//! keeps answering supervision while a collective runs:
//!
//! - [`CommBackend::Fabric`]: a fabric [`Communicator`] on a tokio task of its own (host
//!   buffers, f32 or bf16 bits). Its errors name the failed rank ([`CommActorError::culprit`]).
//! - `CommBackend::Nccl` (feature `cuda`): an `NcclComm` on a dedicated thread, the one place
//!   that blocks on NCCL (joining the communicator, then each operation until its stream is
//!   done). It takes device buffers (`Buf::Device`, with the `cuda` feature) or host ones (copied to the GPU and back).
//!
//! If the worker dies, the pending request's reply port is dropped (the caller's call fails) and
//! the next message fails the actor, which its supervisor then sees.

use flotilla_collectives::{Algo, CommError, Communicator, ReduceOp};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use tokio::sync::mpsc;

/// A buffer handed to a collective: host f32, host bf16 (raw bits), or a device buffer.
#[derive(Debug)]
pub enum Buf {
    F32(Vec<f32>),
    Bf16(Vec<u16>),
    #[cfg(feature = "cuda")]
    Device(flotilla_collectives::nccl_bufs::DeviceBuf),
}

impl Buf {
    /// What the buffer holds, for error messages.
    pub fn describe(&self) -> &'static str {
        match self {
            Buf::F32(_) => "host f32",
            Buf::Bf16(_) => "host bf16",
            #[cfg(feature = "cuda")]
            Buf::Device(_) => "a device buffer",
        }
    }
}

/// The reply port of a request.
pub type Reply<T> = RpcReplyPort<Result<T, CommActorError>>;

/// Requests to a comm actor. Every rank of the group must send the same requests in the same
/// order (they are collectives).
#[derive(Debug)]
pub enum CommMsg {
    AllReduce {
        buf: Buf,
        op: ReduceOp,
        /// The fabric algorithm (NCCL picks its own).
        algo: Algo,
        reply: Reply<Buf>,
    },
    /// `buf`'s length must be a multiple of the group size; replies with this rank's chunk.
    ReduceScatter {
        buf: Buf,
        op: ReduceOp,
        reply: Reply<Buf>,
    },
    /// Replies with every rank's chunk, in group order.
    AllGather {
        chunk: Buf,
        reply: Reply<Buf>,
    },
    /// Replies with `root`'s buffer (other ranks pass one of the same length).
    Broadcast {
        buf: Buf,
        root: usize,
        reply: Reply<Buf>,
    },
    /// `parts[j]` goes to group rank j (any lengths, one element type); replies with the part
    /// from each rank.
    AllToAllV {
        parts: Vec<Buf>,
        reply: Reply<Vec<Buf>>,
    },
    Barrier {
        reply: Reply<()>,
    },
}

/// Why a comm actor's request failed; every variant names the actor's rank.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CommActorError {
    /// The fabric communicator failed (the error names the rank at fault, if known).
    #[error("comm actor of rank {rank}: {source}")]
    Comm {
        rank: usize,
        #[source]
        source: CommError,
    },
    /// NCCL or CUDA failed.
    #[error("comm actor of rank {rank}: {why}")]
    Nccl { rank: usize, why: String },
    /// The request's buffers do not suit the backend.
    #[error("comm actor of rank {rank}: {op} does not take {what} on the {backend} backend")]
    Unsupported {
        rank: usize,
        op: &'static str,
        what: String,
        backend: &'static str,
    },
    /// The worker that owns the backend is gone (it panicked or failed to start).
    #[error("comm actor of rank {rank}: its worker is gone")]
    WorkerGone { rank: usize },
}

impl CommActorError {
    /// The (global) rank at fault, when the failure can be pinned on one.
    pub fn culprit(&self) -> Option<usize> {
        match self {
            CommActorError::Comm { source, .. } => source.culprit(),
            _ => None,
        }
    }
}

/// The backend a comm actor owns.
pub enum CommBackend {
    /// A fabric communicator (in-process, QUIC or simulated fabric).
    Fabric(Communicator),
    /// NCCL on one GPU: the actor's thread joins communicator `id` as `rank` of `world` on
    /// `stream` (every rank's actor must start at about the same time: joining blocks until all
    /// have joined).
    #[cfg(feature = "cuda")]
    Nccl {
        stream: std::sync::Arc<flotilla_collectives::nccl::CudaStream>,
        rank: usize,
        world: usize,
        id: flotilla_collectives::nccl::NcclId,
    },
}

impl std::fmt::Debug for CommBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CommBackend::Fabric(c) => write!(f, "Fabric({:?})", c.ranks()),
            #[cfg(feature = "cuda")]
            CommBackend::Nccl { rank, world, .. } => write!(f, "Nccl(rank {rank} of {world})"),
        }
    }
}

/// Start arguments: the rank (global, for names in errors) and the backend.
#[derive(Debug)]
pub struct CommArgs {
    pub rank: usize,
    pub backend: CommBackend,
}

/// The comm actor (its state is the queue to its worker).
#[derive(Debug, Default)]
pub struct CommActor;

/// The comm actor's state.
pub struct CommState {
    rank: usize,
    work: mpsc::UnboundedSender<CommMsg>,
}

impl Actor for CommActor {
    type Msg = CommMsg;
    type State = CommState;
    type Arguments = CommArgs;

    async fn pre_start(
        &self,
        _me: ActorRef<CommMsg>,
        args: CommArgs,
    ) -> Result<CommState, ActorProcessingErr> {
        let (work, rx) = mpsc::unbounded_channel();
        let rank = args.rank;
        match args.backend {
            CommBackend::Fabric(comm) => {
                tokio::spawn(serve_fabric(comm, rank, rx));
            }
            #[cfg(feature = "cuda")]
            CommBackend::Nccl {
                stream,
                rank: r,
                world,
                id,
            } => nccl::start(rank, stream, r, world, id, rx).await?,
        }
        Ok(CommState { rank, work })
    }

    async fn handle(
        &self,
        _me: ActorRef<CommMsg>,
        msg: CommMsg,
        st: &mut CommState,
    ) -> Result<(), ActorProcessingErr> {
        match st.work.send(msg) {
            Ok(()) => Ok(()),
            Err(mpsc::error::SendError(msg)) => {
                fail(msg, CommActorError::WorkerGone { rank: st.rank });
                Err(format!("comm actor of rank {}: its worker is gone", st.rank).into())
            }
        }
    }
}

/// Answer `msg` with `err`.
fn fail(msg: CommMsg, err: CommActorError) {
    // A caller that stopped waiting is no one's problem.
    match msg {
        CommMsg::AllReduce { reply, .. }
        | CommMsg::ReduceScatter { reply, .. }
        | CommMsg::AllGather { reply, .. }
        | CommMsg::Broadcast { reply, .. } => drop(reply.send(Err(err))),
        CommMsg::AllToAllV { reply, .. } => drop(reply.send(Err(err))),
        CommMsg::Barrier { reply } => drop(reply.send(Err(err))),
    }
}

/// A host buffer of either element type.
enum Host {
    F32(Vec<f32>),
    Bf16(Vec<u16>),
}

impl From<Host> for Buf {
    fn from(h: Host) -> Buf {
        match h {
            Host::F32(v) => Buf::F32(v),
            Host::Bf16(v) => Buf::Bf16(v),
        }
    }
}

/// The host buffer in `buf`, or why the fabric backend cannot take it.
fn host(buf: Buf, rank: usize, op: &'static str) -> Result<Host, CommActorError> {
    match buf {
        Buf::F32(v) => Ok(Host::F32(v)),
        Buf::Bf16(v) => Ok(Host::Bf16(v)),
        #[cfg(feature = "cuda")]
        other => Err(CommActorError::Unsupported {
            rank,
            op,
            what: other.describe().into(),
            backend: "fabric",
        }),
        #[cfg(not(feature = "cuda"))]
        #[allow(unreachable_patterns)]
        _ => unreachable!("{rank} {op}: only host buffers exist without cuda"),
    }
}

/// The fabric worker: serve requests in order until the actor drops its sender.
async fn serve_fabric(
    mut comm: Communicator,
    rank: usize,
    mut rx: mpsc::UnboundedReceiver<CommMsg>,
) {
    while let Some(msg) = rx.recv().await {
        serve_one(&mut comm, rank, msg).await;
    }
}

async fn serve_one(comm: &mut Communicator, rank: usize, msg: CommMsg) {
    let wrap = |source: CommError| CommActorError::Comm { rank, source };
    match msg {
        CommMsg::AllReduce {
            buf,
            op,
            algo,
            reply,
        } => {
            let r = match host(buf, rank, "all_reduce") {
                Ok(Host::F32(v)) => comm.all_reduce(v, op, algo).await.map(Buf::F32),
                Ok(Host::Bf16(v)) => comm.all_reduce_bf16(v, op, algo).await.map(Buf::Bf16),
                Err(e) => return drop(reply.send(Err(e))),
            };
            let _ = reply.send(r.map_err(wrap));
        }
        CommMsg::ReduceScatter { buf, op, reply } => {
            let r = match host(buf, rank, "reduce_scatter") {
                Ok(Host::F32(v)) => comm.reduce_scatter(v, op).await.map(Buf::F32),
                Ok(Host::Bf16(v)) => comm.reduce_scatter_bf16(v, op).await.map(Buf::Bf16),
                Err(e) => return drop(reply.send(Err(e))),
            };
            let _ = reply.send(r.map_err(wrap));
        }
        CommMsg::AllGather { chunk, reply } => {
            let r = match host(chunk, rank, "all_gather") {
                Ok(Host::F32(v)) => comm.all_gather(v).await.map(Buf::F32),
                Ok(Host::Bf16(v)) => comm.all_gather_bf16(v).await.map(Buf::Bf16),
                Err(e) => return drop(reply.send(Err(e))),
            };
            let _ = reply.send(r.map_err(wrap));
        }
        CommMsg::Broadcast { buf, root, reply } => {
            let r = match host(buf, rank, "broadcast") {
                Ok(Host::F32(v)) => comm.broadcast(v, root).await.map(Buf::F32),
                Ok(Host::Bf16(v)) => comm.broadcast_bf16(v, root).await.map(Buf::Bf16),
                Err(e) => return drop(reply.send(Err(e))),
            };
            let _ = reply.send(r.map_err(wrap));
        }
        CommMsg::AllToAllV { parts, reply } => {
            let r = match host_parts(parts, rank) {
                Ok(Parts::F32(p)) => comm
                    .all_to_all_v(p)
                    .await
                    .map(|v| v.into_iter().map(Buf::F32).collect()),
                Ok(Parts::Bf16(p)) => comm
                    .all_to_all_v_bf16(p)
                    .await
                    .map(|v| v.into_iter().map(Buf::Bf16).collect()),
                Err(e) => return drop(reply.send(Err(e))),
            };
            let _ = reply.send(r.map_err(wrap));
        }
        CommMsg::Barrier { reply } => {
            let _ = reply.send(comm.barrier().await.map_err(wrap));
        }
    }
}

/// All-to-all parts of one element type.
enum Parts {
    F32(Vec<Vec<f32>>),
    Bf16(Vec<Vec<u16>>),
}

/// The parts as host buffers of one element type (f32 when there are none).
fn host_parts(parts: Vec<Buf>, rank: usize) -> Result<Parts, CommActorError> {
    let mixed = |what: &str| CommActorError::Unsupported {
        rank,
        op: "all_to_all_v",
        what: format!("parts of mixed element types ({what} among them)"),
        backend: "fabric",
    };
    let bf16 = matches!(parts.first(), Some(Buf::Bf16(_)));
    let mut f = Vec::new();
    let mut b = Vec::new();
    for p in parts {
        match (host(p, rank, "all_to_all_v")?, bf16) {
            (Host::F32(v), false) => f.push(v),
            (Host::Bf16(v), true) => b.push(v),
            (Host::F32(_), true) => return Err(mixed("f32")),
            (Host::Bf16(_), false) => return Err(mixed("bf16")),
        }
    }
    Ok(if bf16 { Parts::Bf16(b) } else { Parts::F32(f) })
}

/// The NCCL backend: a dedicated thread owns the `NcclComm` and serves requests in order.
#[cfg(feature = "cuda")]
mod nccl {
    use std::sync::Arc;

    use flotilla_collectives::nccl::{CudaStream, NcclComm, NcclError, NcclId};
    use flotilla_collectives::nccl_bufs::{DeviceBuf, HostBuf};
    use ractor::ActorProcessingErr;
    use tokio::sync::mpsc;

    use super::{Buf, CommActorError, CommMsg};

    /// Start the NCCL thread and wait until it has joined the communicator.
    pub(super) async fn start(
        rank: usize,
        stream: Arc<CudaStream>,
        nccl_rank: usize,
        world: usize,
        id: NcclId,
        mut rx: mpsc::UnboundedReceiver<CommMsg>,
    ) -> Result<(), ActorProcessingErr> {
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<Result<(), String>>();
        std::thread::Builder::new()
            .name(format!("comm-{rank}-nccl"))
            .spawn(move || {
                let comm = match NcclComm::new(stream, nccl_rank, world, id) {
                    Ok(c) => {
                        let _ = ready_tx.send(Ok(()));
                        c
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e.to_string()));
                        return;
                    }
                };
                // Ends when the actor stops (its sender is dropped).
                while let Some(msg) = rx.blocking_recv() {
                    serve(&comm, rank, msg);
                }
            })?;
        match ready_rx.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(why)) => Err(format!("comm actor of rank {rank}: joining NCCL: {why}").into()),
            Err(_) => Err(format!("comm actor of rank {rank}: the NCCL thread died").into()),
        }
    }

    fn serve(comm: &NcclComm, rank: usize, msg: CommMsg) {
        let err = |e: NcclError| CommActorError::Nccl {
            rank,
            why: e.to_string(),
        };
        // A caller that stopped waiting is no one's problem.
        match msg {
            CommMsg::AllReduce { buf, op, reply, .. } => {
                let r = on_device(comm, buf, |d| comm.all_reduce_buf(d, op));
                drop(reply.send(r.map_err(err)));
            }
            CommMsg::ReduceScatter { buf, op, reply } => {
                let r = on_device(comm, buf, |d| comm.reduce_scatter_buf(d, op));
                drop(reply.send(r.map_err(err)));
            }
            CommMsg::AllGather { chunk, reply } => {
                let r = on_device(comm, chunk, |d| comm.all_gather_buf(d));
                drop(reply.send(r.map_err(err)));
            }
            CommMsg::Broadcast { buf, root, reply } => {
                let r = on_device(comm, buf, |d| comm.broadcast_buf(d, root));
                drop(reply.send(r.map_err(err)));
            }
            CommMsg::AllToAllV { parts, reply } => {
                let r = host_parts(parts, rank).and_then(|p| {
                    let got = comm.all_to_all_v_host(p).map_err(err)?;
                    Ok(got.into_iter().map(from_host).collect())
                });
                drop(reply.send(r));
            }
            CommMsg::Barrier { reply } => drop(reply.send(comm.barrier().map_err(err))),
        }
    }

    fn from_host(h: HostBuf) -> Buf {
        match h {
            HostBuf::F32(v) => Buf::F32(v),
            HostBuf::Bf16(v) => Buf::Bf16(v),
        }
    }

    /// Run `f` on `buf` on the GPU: a host buffer is copied there and the result back (an empty
    /// one is the result as it is: every rank passes one of the same length).
    fn on_device(
        comm: &NcclComm,
        buf: Buf,
        f: impl FnOnce(DeviceBuf) -> Result<DeviceBuf, NcclError>,
    ) -> Result<Buf, NcclError> {
        let up = match buf {
            Buf::Device(d) => return f(d).map(Buf::Device),
            Buf::F32(v) if v.is_empty() => return Ok(Buf::F32(v)),
            Buf::Bf16(v) if v.is_empty() => return Ok(Buf::Bf16(v)),
            Buf::F32(v) => comm.upload_f32(&v)?,
            Buf::Bf16(v) => comm.upload_bf16(&v)?,
        };
        comm.download(&f(up)?).map(from_host)
    }

    /// All-to-all parts must be host buffers here (see `NcclComm::all_to_all_v` for device
    /// buffers with counts).
    fn host_parts(parts: Vec<Buf>, rank: usize) -> Result<Vec<HostBuf>, CommActorError> {
        parts
            .into_iter()
            .map(|p| match p {
                Buf::F32(v) => Ok(HostBuf::F32(v)),
                Buf::Bf16(v) => Ok(HostBuf::Bf16(v)),
                Buf::Device(_) => Err(CommActorError::Unsupported {
                    rank,
                    op: "all_to_all_v",
                    what: "device parts".into(),
                    backend: "nccl",
                }),
            })
            .collect()
    }
}
