//! All-to-all with per-peer counts (MoE token dispatch and combine).
//!
//! Every rank sends part j of its input to group rank j and receives one part from each rank;
//! parts may have any length, zero included (a zero-length part is still a message, so the
//! receiver knows the sender has nothing for it). All sends and receives run concurrently, and
//! the first failure ends the operation at once. The part a rank sends itself is moved across.

use std::future::Future;
use std::pin::Pin;
use std::task::Poll;

use crate::elem::Elem;
use crate::error::CommError;
use crate::op::Op;

/// A boxed fallible future.
type Fallible<'a, T> = Pin<Box<dyn Future<Output = Result<T, CommError>> + Send + 'a>>;

/// One send (`None`) or receive (`Some((peer, part))`) of the exchange.
type Part<'a, T> = Fallible<'a, Option<(usize, Vec<T>)>>;

/// Run every future to completion, or stop at the first error (dropping the rest).
async fn try_join_all<T>(futs: Vec<Fallible<'_, T>>) -> Result<Vec<T>, CommError> {
    let mut futs: Vec<_> = futs.into_iter().map(Some).collect();
    let mut outs: Vec<Option<T>> = futs.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (slot, out) in futs.iter_mut().zip(outs.iter_mut()) {
            if let Some(f) = slot {
                match f.as_mut().poll(cx) {
                    Poll::Ready(Ok(v)) => {
                        *out = Some(v);
                        *slot = None;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            Poll::Pending
        } else {
            Poll::Ready(Ok(()))
        }
    })
    .await?;
    Ok(outs.into_iter().flatten().collect())
}

/// All-to-all of `send` (one part per group rank); returns the part from each rank.
pub(crate) async fn all_to_all_v<T: Elem>(
    ctx: &Op,
    send: Vec<Vec<T>>,
) -> Result<Vec<Vec<T>>, CommError> {
    let (n, me) = (ctx.size(), ctx.me());
    if send.len() != n {
        return Err(ctx.invalid(format!(
            "{} send parts for a group of {n} ranks",
            send.len()
        )));
    }
    let mut recv: Vec<Vec<T>> = (0..n).map(|_| Vec::new()).collect();
    let mut futs: Vec<Part<'_, T>> = Vec::with_capacity(2 * n);
    for (j, part) in send.into_iter().enumerate() {
        if j == me {
            recv[me] = part;
        } else {
            let len = part.len();
            futs.push(Box::pin(async move {
                ctx.send(j, 0, part, len).await.map(|()| None)
            }));
        }
    }
    for j in (0..n).filter(|&j| j != me) {
        futs.push(Box::pin(async move {
            ctx.recv(j, 0, None).await.map(|v| Some((j, v)))
        }));
    }
    for (j, part) in try_join_all(futs).await?.into_iter().flatten() {
        recv[j] = part;
    }
    Ok(recv)
}
