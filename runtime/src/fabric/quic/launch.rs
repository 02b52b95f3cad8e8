//! Starting the ranks of a QUIC mesh in child processes on one host (tests, benchmarks,
//! single-host jobs): the parent runs rank 0 and holds the job CA; it ships each child its
//! [`RankIdentity`] over the child's stdin, collects the address each child bound from its
//! stdout, and sends every child the full address list.
//!
//! The line protocol (every line starts with [`PREFIX`]; other stdout lines and text before the
//! prefix, such as a test harness's chatter, are ignored):
//!
//! | direction      | line                                   |
//! | -------------- | -------------------------------------- |
//! | parent → child | `flotilla-quic id <hex of RankIdentity::to_bytes>` |
//! | parent → child | `flotilla-quic world <n>`              |
//! | child → parent | `flotilla-quic addr <socket address>`  |
//! | parent → child | `flotilla-quic peers <addr>,<addr>,…`  |
//!
//! After that both sides may exchange their own lines ([`Children::send_line`],
//! [`Children::recv_line`], [`child_line`], [`child_send_line`]). Every wait has a deadline; a
//! child that is still running when [`Children`] is dropped is killed.

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::{JobCa, QuicError, QuicFabric, QuicOptions, RankIdentity};
use crate::fabric::Rank;

/// The first word of every protocol line.
pub const PREFIX: &str = "flotilla-quic";

fn err(why: impl std::fmt::Display) -> QuicError {
    QuicError::Launch(why.to_string())
}

/// Lower-case hex of `b`.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The bytes of lower- or upper-case hex `s`.
pub fn unhex(s: &str) -> Result<Vec<u8>, QuicError> {
    let s = s.as_bytes();
    if !s.len().is_multiple_of(2) {
        return Err(err("odd-length hex"));
    }
    let digit = |c: u8| (c as char).to_digit(16).ok_or_else(|| err("bad hex digit"));
    s.chunks(2)
        .map(|p| Ok((digit(p[0])? * 16 + digit(p[1])?) as u8))
        .collect()
}

/// The body of a protocol line `flotilla-quic <word> <body>`, if `line` is one.
fn field<'a>(line: &'a str, word: &str) -> Option<&'a str> {
    let rest = line.trim_end().strip_prefix(PREFIX)?.strip_prefix(' ')?;
    rest.strip_prefix(word)?.strip_prefix(' ')
}

/// The parent's handle on child ranks `1..world`.
#[derive(Debug)]
pub struct Children {
    kids: Vec<Child>,
    ranks: Vec<Rank>,
    stdins: Vec<ChildStdin>,
    lines: mpsc::Receiver<(Rank, String)>,
}

impl Children {
    /// Spawn ranks `1..world` with `command(rank)` (stdin and stdout are piped here) and send
    /// each its identity from `ca`.
    pub fn spawn(
        ca: &JobCa,
        world: usize,
        command: impl FnMut(Rank) -> Command,
    ) -> Result<Self, QuicError> {
        let ids = (1..world)
            .map(|r| ca.issue(r))
            .collect::<Result<Vec<_>, _>>()?;
        Self::spawn_with_ids(ids, world, command)
    }

    /// Spawn one child per identity (issued by any CA: tests of refusal use a foreign one),
    /// running the identity's rank.
    pub fn spawn_with_ids(
        ids: Vec<RankIdentity>,
        world: usize,
        command: impl FnMut(Rank) -> Command,
    ) -> Result<Self, QuicError> {
        let mut me = Self::spawn_raw(ids.iter().map(|id| id.rank).collect(), command)?;
        for id in ids {
            me.send_line(id.rank, &format!("id {}", hex(&id.to_bytes())))?;
            me.send_line(id.rank, &format!("world {world}"))?;
        }
        Ok(me)
    }

    /// Spawn one child per entry of `ranks` and send nothing yet (for other line protocols,
    /// such as the benchmarks' baselines).
    pub fn spawn_raw(
        ranks: Vec<Rank>,
        mut command: impl FnMut(Rank) -> Command,
    ) -> Result<Self, QuicError> {
        let (tx, lines) = mpsc::channel();
        let mut me = Self {
            kids: Vec::new(),
            ranks: Vec::new(),
            stdins: Vec::new(),
            lines,
        };
        for rank in ranks {
            let mut child = command(rank)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .map_err(|e| err(format!("spawning rank {rank}: {e}")))?;
            let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
                return Err(err(format!("rank {rank} has no stdin or stdout")));
            };
            me.kids.push(child);
            me.ranks.push(rank);
            me.stdins.push(stdin);
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { return };
                    // A test harness may have printed a partial line before ours.
                    let Some(at) = line.find(PREFIX) else {
                        continue;
                    };
                    if tx.send((rank, line[at..].to_string())).is_err() {
                        return;
                    }
                }
            });
        }
        Ok(me)
    }

    fn send_line_at(&mut self, i: usize, line: &str) -> Result<(), QuicError> {
        let stdin = &mut self.stdins[i];
        writeln!(stdin, "{PREFIX} {line}")
            .and_then(|()| stdin.flush())
            .map_err(|e| err(format!("writing to child {i}: {e}")))
    }

    /// Send `flotilla-quic <line>` to the child that runs `rank`.
    pub fn send_line(&mut self, rank: Rank, line: &str) -> Result<(), QuicError> {
        let i = self
            .ranks
            .iter()
            .position(|&r| r == rank)
            .ok_or_else(|| err(format!("no child runs rank {rank}")))?;
        self.send_line_at(i, line)
    }

    /// The next protocol line of any child, as (rank, the line after the prefix).
    pub fn recv_line(&self, timeout: Duration) -> Result<(Rank, String), QuicError> {
        let (rank, line) = self
            .lines
            .recv_timeout(timeout)
            .map_err(|e| err(format!("no line from the children in {timeout:?}: {e}")))?;
        let body = line
            .strip_prefix(PREFIX)
            .unwrap_or(&line)
            .trim()
            .to_string();
        Ok((rank, body))
    }

    /// The addresses the children bound, indexed by rank (entry 0 is `rank0`).
    pub fn addrs(
        &self,
        rank0: SocketAddr,
        timeout: Duration,
    ) -> Result<Vec<SocketAddr>, QuicError> {
        let mut addrs = vec![None; self.kids.len() + 1];
        addrs[0] = Some(rank0);
        if self.ranks.iter().enumerate().any(|(i, &r)| r != i + 1) {
            return Err(err("the children do not run ranks 1..world in order"));
        }
        let deadline = Instant::now() + timeout;
        while addrs.iter().any(Option::is_none) {
            let left = deadline.saturating_duration_since(Instant::now());
            let (rank, line) = self
                .lines
                .recv_timeout(left)
                .map_err(|_| err(format!("children did not report addresses in {timeout:?}")))?;
            if let Some(a) = field(&line, "addr") {
                let a = a
                    .parse()
                    .map_err(|e| err(format!("rank {rank} address {a:?}: {e}")))?;
                if let Some(slot) = addrs.get_mut(rank) {
                    *slot = Some(a);
                }
            }
        }
        Ok(addrs.into_iter().flatten().collect())
    }

    /// Send every child the full address list.
    pub fn send_peers(&mut self, peers: &[SocketAddr]) -> Result<(), QuicError> {
        let list: Vec<String> = peers.iter().map(ToString::to_string).collect();
        let line = format!("peers {}", list.join(","));
        for i in 0..self.stdins.len() {
            self.send_line_at(i, &line)?;
        }
        Ok(())
    }

    /// Wait for every child to exit (killing those still running at the deadline).
    pub fn wait(mut self, timeout: Duration) -> Result<Vec<ExitStatus>, QuicError> {
        let deadline = Instant::now() + timeout;
        let mut out = Vec::new();
        for (i, kid) in self.kids.iter_mut().enumerate() {
            loop {
                match kid.try_wait() {
                    Ok(Some(status)) => {
                        out.push(status);
                        break;
                    }
                    Ok(None) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    Ok(None) => {
                        let _ = kid.kill();
                        let r = self.ranks[i];
                        return Err(err(format!("rank {r} did not exit in {timeout:?}")));
                    }
                    Err(e) => return Err(err(format!("waiting for rank {}: {e}", self.ranks[i]))),
                }
            }
        }
        Ok(out)
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        for kid in &mut self.kids {
            if let Ok(None) = kid.try_wait() {
                let _ = kid.kill();
                let _ = kid.wait();
            }
        }
    }
}

/// Parent side: bind rank 0 on `listen`, spawn ranks `1..world` with `command(rank)`, and join
/// the mesh with them, within `opts.connect_timeout`.
pub async fn parent_mesh(
    ca: &JobCa,
    world: usize,
    listen: SocketAddr,
    opts: QuicOptions,
    command: impl FnMut(Rank) -> Command,
) -> Result<(QuicFabric, Children), QuicError> {
    let timeout = opts.connect_timeout;
    let fabric = QuicFabric::bind(0, world, listen, ca, opts).await?;
    let mut kids = Children::spawn(ca, world, command)?;
    let me = fabric.local_addr()?;
    let (kids_back, addrs) = tokio::task::spawn_blocking(move || {
        let addrs = kids.addrs(me, timeout);
        (kids, addrs)
    })
    .await
    .map_err(err)?;
    kids = kids_back;
    let addrs = addrs?;
    kids.send_peers(&addrs)?;
    fabric.connect_all(&addrs).await?;
    Ok((fabric, kids))
}

/// Child side, line reading: the next `flotilla-quic …` line on stdin (after the prefix).
pub fn child_line() -> Result<String, QuicError> {
    let mut line = String::new();
    loop {
        line.clear();
        let n = std::io::stdin()
            .lock()
            .read_line(&mut line)
            .map_err(|e| err(format!("reading stdin: {e}")))?;
        if n == 0 {
            return Err(err("stdin closed"));
        }
        if let Some(body) = line.trim_end().strip_prefix(PREFIX) {
            return Ok(body.trim().to_string());
        }
    }
}

/// Child side: print `flotilla-quic <line>` on stdout.
pub fn child_send_line(line: &str) -> Result<(), QuicError> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{PREFIX} {line}")
        .and_then(|()| out.flush())
        .map_err(|e| err(format!("writing stdout: {e}")))
}

async fn next_line(word: &'static str) -> Result<String, QuicError> {
    let line = tokio::task::spawn_blocking(child_line)
        .await
        .map_err(err)??;
    line.strip_prefix(word)
        .map(|b| b.trim().to_string())
        .ok_or_else(|| err(format!("expected `{word}`, got {line:?}")))
}

/// Child side: read the identity and world from stdin, bind on `listen`, report the address,
/// read the peers and join the mesh (within `opts.connect_timeout`).
pub async fn child_mesh(listen: SocketAddr, opts: QuicOptions) -> Result<QuicFabric, QuicError> {
    let id = RankIdentity::from_bytes(&unhex(&next_line("id").await?)?)?;
    let world: usize = next_line("world")
        .await?
        .parse()
        .map_err(|e| err(format!("world: {e}")))?;
    let fabric = QuicFabric::bind_with_identity(id, world, listen, opts).await?;
    child_send_line(&format!("addr {}", fabric.local_addr()?))?;
    let peers = next_line("peers")
        .await?
        .split(',')
        .map(|a| {
            a.parse()
                .map_err(|e| err(format!("peer address {a:?}: {e}")))
        })
        .collect::<Result<Vec<SocketAddr>, QuicError>>()?;
    fabric.connect_all(&peers).await?;
    Ok(fabric)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trips_and_lines_parse() {
        let b = vec![0u8, 1, 0xab, 0xff];
        assert_eq!(unhex(&hex(&b)).expect("hex"), b);
        assert!(unhex("abc").is_err());
        assert!(unhex("zz").is_err());
        assert_eq!(
            field("flotilla-quic addr 1.2.3.4:5", "addr"),
            Some("1.2.3.4:5")
        );
        assert_eq!(field("flotilla-quic addrx 1", "addr"), None);
        assert_eq!(field("other addr 1", "addr"), None);
    }
}
