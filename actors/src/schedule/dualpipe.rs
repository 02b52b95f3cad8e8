//! DualPipe (DeepSeek-V3 report §3.2.1): bidirectional pipeline with overlapped F&B pairs.
//!
//! Rank `r` holds stage `r` of the direction fed at rank 0 (chunks `0..chunks/2`) and stage
//! `pp−1−r` of the direction fed at rank `pp−1` (chunks `chunks/2..chunks`). Each rank calls
//! *phase 0* the direction whose input is nearer to it and *phase 1* the other one, and rank `r`
//! behaves like rank `h = min(r, pp−1−r)` of a half-size pipeline of `n = pp/2` ranks. Its list
//! follows DeepSeek's reference implementation in eight steps:
//!
//! 1. `2(n−h−1)` × F0 — warm-up forwards of the near direction;
//! 2. `h+1` × (F0, F1) — both directions' forwards interleave;
//! 3. `n−h−1` × (B1, W, F1) — zero-bubble: `B` only, `W` of the oldest deferred backward;
//! 4. `chunks/2 − 2n + h + 1` × (F0&B1, F1&B0) — the steady state of overlapped pairs (on the
//!    middle ranks the first F0, B1 run apart, not overlapped, to shorten the bubble);
//! 5. `n−h−1` × (B1, F1&B0);
//! 6. `h+1` × (B1, B0) — full backwards, switching to deferred `W` half-way;
//! 7. `n−h−1` × (W, B0) — deferred `W`s fill the drain;
//! 8. `h+1` × W — the remaining deferred `W`s.
//!
//! Deferred `W`s leave a FIFO shared by both phases. Full backwards (`BW`, in steps 4–6, and the
//! `b` half of every F&B pair) include their `W`. DualPipeV (`dualpipev.rs`) is the same generator on the
//! V placement.

use std::collections::VecDeque;

use super::Action;

/// Rank `r` holds stages `r` (chunks of the first half) and `pp−1−r` (second half).
pub(super) fn build(pp: usize, chunks: usize) -> Vec<Vec<Action>> {
    let half_chunks = chunks / 2;
    (0..pp)
        .map(|r| {
            let second_half = r >= pp / 2;
            let half_rank = r.min(pp - 1 - r);
            bidirectional(pp / 2, half_rank, half_chunks, |phase, k| {
                let dir = phase ^ usize::from(second_half);
                let stage = if dir == 0 { r } else { pp - 1 - r };
                (dir * half_chunks + k, stage)
            })
        })
        .collect()
}

/// The eight steps for rank `h` of `n`, with `m` micro-batches per phase; `place(phase, k)`
/// names the (chunk, stage) of the `k`-th micro-batch of `phase` on this rank.
pub(super) fn bidirectional(
    n: usize,
    h: usize,
    m: usize,
    place: impl Fn(usize, usize) -> (usize, usize),
) -> Vec<Action> {
    let mut g = Gen {
        acts: Vec::with_capacity(6 * m),
        next_f: [0; 2],
        next_b: [0; 2],
        deferred: VecDeque::new(),
        place,
    };
    let middle = h + 1 == n;
    for _ in 0..2 * (n - h - 1) {
        g.forward(0);
    }
    for _ in 0..=h {
        g.forward(0);
        g.forward(1);
    }
    for _ in 0..n - h - 1 {
        g.backward(1, true);
        g.weight();
        g.forward(1);
    }
    for i in 0..(m + h + 1).saturating_sub(2 * n) {
        if i == 0 && middle {
            g.forward(0);
            g.backward(1, false);
        } else {
            g.pair(0, 1);
        }
        g.pair(1, 0);
    }
    for _ in 0..n - h - 1 {
        g.backward(1, false);
        g.pair(1, 0);
    }
    let step_6 = h + 1;
    let mut zb = false;
    for i in 0..step_6 {
        if i == step_6 / 2 && h % 2 == 1 {
            zb = true;
        }
        g.backward(1, zb);
        if i == step_6 / 2 && h.is_multiple_of(2) {
            zb = true;
        }
        g.backward(0, zb);
    }
    for _ in 0..n - h - 1 {
        g.weight();
        g.backward(0, true);
    }
    while !g.deferred.is_empty() {
        g.weight();
    }
    g.acts
}

struct Gen<P> {
    acts: Vec<Action>,
    next_f: [usize; 2],
    next_b: [usize; 2],
    deferred: VecDeque<(usize, usize)>,
    place: P,
}

impl<P: Fn(usize, usize) -> (usize, usize)> Gen<P> {
    fn take_f(&mut self, phase: usize) -> (usize, usize) {
        self.next_f[phase] += 1;
        (self.place)(phase, self.next_f[phase] - 1)
    }

    fn take_b(&mut self, phase: usize) -> (usize, usize) {
        self.next_b[phase] += 1;
        (self.place)(phase, self.next_b[phase] - 1)
    }

    fn forward(&mut self, phase: usize) {
        let (chunk, stage) = self.take_f(phase);
        self.acts.push(Action::F { chunk, stage });
    }

    /// A full backward `BW`, or with `zero_bubble` a `B` whose `W` goes to the FIFO.
    fn backward(&mut self, phase: usize, zero_bubble: bool) {
        let (chunk, stage) = self.take_b(phase);
        if zero_bubble {
            self.acts.push(Action::B { chunk, stage });
            self.deferred.push_back((chunk, stage));
        } else {
            self.acts.push(Action::BW { chunk, stage });
        }
    }

    /// The oldest deferred `W`.
    fn weight(&mut self) {
        if let Some((chunk, stage)) = self.deferred.pop_front() {
            self.acts.push(Action::W { chunk, stage });
        }
    }

    /// Forward of `f_phase` overlapped with the full backward of `b_phase`.
    fn pair(&mut self, f_phase: usize, b_phase: usize) {
        let f = self.take_f(f_phase);
        let b = self.take_b(b_phase);
        self.acts.push(Action::FB { f, b });
    }
}
