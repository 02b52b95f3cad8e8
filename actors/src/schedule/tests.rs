//! Tests of the schedules: validity and deadlock freedom of every kind, refusal of bad
//! parameters, the checker's findings, the DeepSeek-V3 report's Table 2 bubbles and activation
//! memory reproduced by measurement, and the JSON / SVG outputs.
//!
//! "Bubble" is measured per rank as makespan − busy time ([`Timeline::bubble`]); Table 2's value
//! is the pipeline's worst rank, [`Timeline::max_bubble`]. For 1F1B and ZB1P every rank's bubble
//! equals the formula; for DualPipe the middle ranks' does (the outer ranks idle less when
//! F&B < F + B).

use super::*;

const EPS: f64 = 1e-9;

/// Costs in the report's notation: F, full backward B, its weight part W, overlapped F&B.
pub(crate) fn report_costs(f: f64, full_b: f64, w: f64, fb: f64) -> Costs {
    Costs {
        f,
        b: full_b - w,
        w,
        fb,
        comm: 0.0,
    }
}

/// Table 2's bubble for `kind` (1F1B, ZB1P, DualPipe) with `pp` ranks.
pub(crate) fn table2(kind: Kind, pp: usize, c: &Costs) -> f64 {
    let p = pp as f64;
    let full_b = c.full_backward();
    match kind {
        Kind::GPipe | Kind::OneF1B => (p - 1.0) * (c.f + full_b),
        Kind::Zb1p => (p - 1.0) * (c.f + full_b - 2.0 * c.w),
        Kind::DualPipe => (p / 2.0 - 1.0) * (c.fb + full_b - 3.0 * c.w),
        // The V is DualPipe over 2·pp stages: PP in the formula is the stage count.
        Kind::DualPipeV => (p - 1.0) * (c.fb + full_b - 3.0 * c.w),
    }
}

fn timed(kind: Kind, pp: usize, chunks: usize, costs: &Costs) -> Timeline {
    let s = build(kind, pp, chunks).expect("valid parameters");
    simulate(&s, costs).expect("schedule checks")
}

/// Chunk counts to try for `pp`, valid or not for a given kind.
fn chunk_counts(pp: usize) -> Vec<usize> {
    vec![1, pp, pp + 1, 2 * pp, 2 * pp + 1, 2 * pp + 2, 3 * pp, 20]
}

#[test]
fn schedule_every_kind_valid_and_deadlock_free() {
    for kind in Kind::ALL {
        for pp in [2, 4, 8] {
            let mut built = 0;
            for chunks in chunk_counts(pp) {
                let Ok(s) = build(kind, pp, chunks) else {
                    continue;
                };
                built += 1;
                check(&s).unwrap_or_else(|e| panic!("{kind} pp={pp} chunks={chunks}: {e}"));
                assert_eq!(s.ranks.len(), pp);
                // Three unit operations per (chunk, stage), each exactly once.
                let units: usize = s.ranks.iter().flatten().map(|a| a.units().len()).sum();
                assert_eq!(
                    units,
                    3 * chunks * s.stages(),
                    "{kind} pp={pp} chunks={chunks}"
                );
                let t = simulate(&s, &Costs::default()).expect("simulates");
                assert!(t.bubble.iter().all(|b| *b >= -EPS));
            }
            // At least 2·pp, 2·pp+2, 3·pp and 20 are valid for every kind.
            assert!(
                built >= 4,
                "{kind} pp={pp}: only {built} chunk counts built"
            );
        }
    }
}

#[test]
fn schedule_invalid_parameters_refused() {
    for kind in Kind::ALL {
        assert_eq!(build(kind, 0, 8), Err(ScheduleError::ZeroPp));
        assert_eq!(build(kind, 2, 0), Err(ScheduleError::ZeroChunks));
    }
    assert!(matches!(
        build(Kind::DualPipe, 3, 12),
        Err(ScheduleError::OddPp { pp: 3, .. })
    ));
    assert!(matches!(
        build(Kind::DualPipe, 4, 9),
        Err(ScheduleError::OddChunks { chunks: 9, .. })
    ));
    for kind in [Kind::DualPipe, Kind::DualPipeV] {
        let e = build(kind, 4, 6).expect_err("chunks < 2·pp");
        assert!(
            matches!(e, ScheduleError::TooFewChunks { min: 8, .. }),
            "{e}"
        );
        assert!(e.to_string().contains("chunks >= 8"), "{e}");
        assert!(build(kind, 4, 8).is_ok());
    }
    for kind in [Kind::OneF1B, Kind::Zb1p] {
        let e = build(kind, 8, 7).expect_err("chunks < pp");
        assert!(
            matches!(e, ScheduleError::TooFewChunks { min: 8, .. }),
            "{e}"
        );
        assert!(build(kind, 8, 8).is_ok());
    }
    assert!(build(Kind::GPipe, 8, 1).is_ok());
    assert!(
        build(Kind::DualPipeV, 3, 6).is_ok(),
        "DualPipeV takes an odd pp"
    );
    assert_eq!("1F1B".parse::<Kind>(), Ok(Kind::OneF1B));
    assert_eq!("dualpipev".parse::<Kind>(), Ok(Kind::DualPipeV));
    assert!(matches!(
        "pipedream".parse::<Kind>(),
        Err(ScheduleError::UnknownKind(_))
    ));
}

#[test]
fn schedule_checker_finds_deadlock_and_bad_lists() {
    let good = build(Kind::OneF1B, 2, 4).expect("valid");
    // Rank 0 runs B of chunk 0 before any forward: it waits for its own F, rank 1 for that F.
    let mut s = good.clone();
    let b = s.ranks[0]
        .iter()
        .position(|a| matches!(a, Action::BW { chunk: 0, .. }))
        .expect("has BW0");
    let a = s.ranks[0].remove(b);
    s.ranks[0].insert(0, a);
    match check(&s) {
        Err(CheckError::Deadlock { blocked, .. }) => {
            assert_eq!(blocked.len(), 2, "{blocked:?}");
            assert_eq!(blocked[0].action, Action::BW { chunk: 0, stage: 0 });
            assert!(blocked[0].waiting_for.contains(&Unit {
                op: Op::F,
                chunk: 0,
                stage: 0
            }));
            assert_eq!(blocked[1].action, Action::F { chunk: 0, stage: 1 });
        }
        other => panic!("expected a deadlock, got {other:?}"),
    }
    assert!(simulate(&s, &Costs::default()).is_err());

    let mut s = good.clone();
    s.ranks[1].push(Action::F { chunk: 0, stage: 1 });
    assert!(matches!(check(&s), Err(CheckError::Duplicate { .. })));
    let mut s = good.clone();
    s.ranks[1].retain(|a| *a != Action::BW { chunk: 3, stage: 1 });
    assert!(matches!(check(&s), Err(CheckError::Missing { .. })));
    let mut s = good.clone();
    s.ranks[0].push(Action::W { chunk: 9, stage: 0 });
    assert!(matches!(check(&s), Err(CheckError::OutOfRange { .. })));
    let mut s = good;
    let moved = s.ranks[1].remove(0);
    s.ranks[0].push(moved);
    assert!(matches!(
        check(&s),
        Err(CheckError::Misplaced { expected: 1, .. })
    ));
}

/// Cost settings (report notation F, B, W, F&B) under which the formulas are exact: the report
/// derives them with the forward equal to the backward for input (F = B − W), W ≤ F.
pub(crate) fn exact_settings() -> Vec<Costs> {
    vec![
        report_costs(1.0, 2.0, 1.0, 3.0), // no overlap gain: F&B = F + B
        report_costs(1.0, 2.0, 1.0, 2.0), // overlap hides a third
        report_costs(2.0, 3.0, 1.0, 4.0),
        report_costs(3.0, 5.0, 2.0, 6.5),
    ]
}

#[test]
fn schedule_bubble_matches_table2_for_1f1b_and_zb1p() {
    let mut settings = exact_settings();
    // 1F1B and ZB1P also match when the backward for input is longer than the forward.
    settings.push(report_costs(2.0, 4.0, 1.0, 5.0));
    settings.push(report_costs(1.0, 3.0, 1.0, 3.0));
    for pp in [4, 8, 16] {
        for chunks in [pp, 2 * pp, 3 * pp + 1] {
            for c in &settings {
                for kind in [Kind::OneF1B, Kind::Zb1p] {
                    let t = timed(kind, pp, chunks, c);
                    let want = table2(kind, pp, c);
                    for (r, b) in t.bubble.iter().enumerate() {
                        assert!(
                            (b - want).abs() < EPS,
                            "{kind} pp={pp} chunks={chunks} {c:?}: rank {r} bubble {b}, Table 2 {want}"
                        );
                    }
                }
            }
        }
    }
    // Measured, pp = 8, F = B − W = W = 1: 1F1B 21 = 7·(1+2), ZB1P 7 = 7·(1+2−2).
    let c = report_costs(1.0, 2.0, 1.0, 3.0);
    assert_eq!(timed(Kind::OneF1B, 8, 20, &c).max_bubble(), 21.0);
    assert_eq!(timed(Kind::Zb1p, 8, 20, &c).max_bubble(), 7.0);
    // GPipe has 1F1B's bubble (and far more memory).
    assert_eq!(timed(Kind::GPipe, 8, 20, &c).max_bubble(), 21.0);
    // ZB1P off the formula: a W longer than F (F = B−W = 1, W = 2) no longer fits the drain;
    // the formula gives (PP−1)(1+3−4) = 0, measured PP−1 (every rank).
    let c = report_costs(1.0, 3.0, 2.0, 4.0);
    for pp in [4, 8, 16] {
        assert_eq!(table2(Kind::Zb1p, pp, &c), 0.0);
        assert_eq!(
            timed(Kind::Zb1p, pp, 2 * pp, &c).max_bubble(),
            (pp - 1) as f64
        );
    }
}

#[test]
fn schedule_bubble_matches_table2_for_dualpipe() {
    for pp in [4, 8, 16] {
        for chunks in [2 * pp, 2 * pp + 4, 3 * pp] {
            for c in &exact_settings() {
                for kind in [Kind::DualPipe, Kind::DualPipeV] {
                    let t = timed(kind, pp, chunks, c);
                    let want = table2(kind, pp, c);
                    let got = t.max_bubble();
                    assert!(
                        (got - want).abs() < EPS,
                        "{kind} pp={pp} chunks={chunks} {c:?}: bubble {got}, Table 2 {want} ({:?})",
                        t.bubble
                    );
                    // The worst ranks are the middle ones of DualPipe, the last ones of the V.
                    let worst = if kind == Kind::DualPipe {
                        pp / 2
                    } else {
                        pp - 1
                    };
                    assert!((t.bubble[worst] - want).abs() < EPS);
                }
            }
        }
    }
    // The report's figure: pp = 8, 20 micro-batches. F = B − W = W = 1, F&B = 2:
    // (8/2 − 1)(2 + 2 − 3) = 3 on the middle ranks, less towards the ends.
    let t = timed(Kind::DualPipe, 8, 20, &report_costs(1.0, 2.0, 1.0, 2.0));
    assert_eq!(t.bubble, vec![1.0, 2.0, 3.0, 3.0, 3.0, 3.0, 2.0, 1.0]);
    // With F&B = F + B every rank's bubble is the formula's (8/2 − 1)(3 + 2 − 3) = 6.
    let t = timed(Kind::DualPipe, 8, 20, &report_costs(1.0, 2.0, 1.0, 3.0));
    assert_eq!(t.bubble, vec![6.0; 8]);
}

#[test]
fn schedule_dualpipe_bubble_off_formula_when_f_differs_from_input_backward() {
    // Table 2's DualPipe formula is exact when the forward equals the backward for input
    // (F = B − W) and W ≤ F, as in the report's figure (tested above). Outside that regime the
    // exact schedule differs from it; measured worst-rank bubbles, pinned for pp = 4, 8, 16:
    // 1. a longer backward for input (F=2, B=4, W=1, F&B=5): measured 5, 16, 40 against the
    //    formula's 6, 18, 42, i.e. the formula over-counts by 1, 2, 2 (we have not derived a
    //    closed form for this regime; the difference does not grow with pp beyond 8).
    let c = report_costs(2.0, 4.0, 1.0, 5.0);
    for (pp, measured, formula) in [(4, 5.0, 6.0), (8, 16.0, 18.0), (16, 40.0, 42.0)] {
        let t = timed(Kind::DualPipe, pp, 2 * pp + 4, &c);
        assert_eq!(t.max_bubble(), measured, "pp={pp}");
        assert_eq!(table2(Kind::DualPipe, pp, &c), formula, "pp={pp}");
    }
    // 2. a backward for input shorter than both F and W: the formula under-counts by exactly
    //    (PP/2 − 1)·((F − (B−W)) + (W − (B−W))), measured for three settings: consistent with
    //    the formula charging each of the PP/2 − 1 hops towards the middle ranks with a
    //    backward for input where the schedule's slots (step 3's "B, W, F", the drain's "W, B")
    //    actually wait for the longer F or W.
    for (f, full_b, w, fb) in [
        (3.0, 2.0, 1.0, 4.0),
        (2.0, 3.0, 2.0, 4.0),
        (1.0, 3.0, 2.0, 3.0),
    ] {
        let c = report_costs(f, full_b, w, fb);
        let b_in = full_b - w;
        for pp in [4, 8, 16] {
            let t = timed(Kind::DualPipe, pp, 2 * pp + 4, &c);
            let extra = (pp as f64 / 2.0 - 1.0) * ((f - b_in) + (w - b_in));
            assert!(
                (t.max_bubble() - table2(Kind::DualPipe, pp, &c) - extra).abs() < EPS,
                "pp={pp} {c:?}: measured {}, formula {}, expected extra {extra}",
                t.max_bubble(),
                table2(Kind::DualPipe, pp, &c)
            );
        }
    }
}

#[test]
fn schedule_peak_activation_memory() {
    // Measured (activations in stage micro-batches, freed by B): 1F1B and ZB1P hold PP on rank
    // 0 (PP − r on rank r); DualPipe PP + 1 on every rank; the V 2·pp + 1 of its half-size
    // stages (PP + 1 with PP = 2·pp stages); GPipe every micro-batch.
    for pp in [2, 4, 8, 16] {
        let chunks = 2 * pp + 4;
        let c = Costs::default();
        let one = timed(Kind::OneF1B, pp, chunks, &c).peak_activations;
        assert_eq!(one, (0..pp).map(|r| pp - r).collect::<Vec<_>>());
        assert_eq!(timed(Kind::Zb1p, pp, chunks, &c).peak_activations, one);
        let dual = timed(Kind::DualPipe, pp, chunks, &c).peak_activations;
        assert_eq!(dual, vec![pp + 1; pp], "DualPipe pp={pp}");
        let v = timed(Kind::DualPipeV, pp, chunks, &c).peak_activations;
        assert_eq!(v, vec![2 * pp + 1; pp], "DualPipeV pp={pp}");
        let g = timed(Kind::GPipe, pp, chunks, &c).peak_activations;
        assert_eq!(g, vec![chunks; pp]);
    }
}

/// `Schedule::split`: every kind, each micro-batch as 2 or 3 sub-batches, is still proven
/// correct and deadlock-free, holds at most `s` times the peak in sub-batches (the same memory;
/// where the peak is an F&B pair's, whose forward is held before its backward frees, the split
/// pairs of one micro-batch free in turn: `s − 1` fewer), and keeps every sub-batch on its
/// micro-batch's ranks (DualPipe's two directions).
#[test]
fn schedule_split_into_sub_batches_keeps_correctness_and_memory() {
    for kind in Kind::ALL {
        for pp in [2, 4] {
            let chunks = 2 * pp + 2;
            let whole = build(kind, pp, chunks).expect("valid parameters");
            let peak = simulate(&whole, &Costs::default())
                .expect("checks")
                .peak_activations;
            for s in [2, 3] {
                let split = whole.split(s);
                check(&split).unwrap_or_else(|e| panic!("{kind} pp={pp} split {s}: {e}"));
                assert_eq!(split.chunks, chunks * s);
                let t = simulate(&split, &Costs::default()).expect("simulates");
                for (got, p) in t.peak_activations.iter().zip(&peak) {
                    assert!(
                        (p * s - (s - 1)..=p * s).contains(got),
                        "{kind} pp={pp} split {s}: peak {got} for {p} micro-batches"
                    );
                }
                for c in 0..split.chunks {
                    for stage in 0..split.stages() {
                        assert_eq!(
                            split.rank_of(c, stage),
                            whole.rank_of(c / s, stage),
                            "{kind} pp={pp} split {s}: chunk {c} stage {stage}"
                        );
                    }
                }
            }
        }
    }
    let one = build(Kind::DualPipe, 2, 4).expect("valid");
    assert_eq!(one.split(1), one, "one sub-batch is the schedule itself");
}

#[test]
fn schedule_dualpipe_phases_follow_the_report() {
    // pp = 8, 20 micro-batches (the report's figure): rank 0 starts with 6 warm-up forwards of
    // its own direction, then interleaves the other direction's forward (chunk 10, stage 7).
    let s = build(Kind::DualPipe, 8, 20).expect("valid");
    let head: Vec<Action> = s.ranks[0][..8].to_vec();
    let mut want: Vec<Action> = (0..7).map(|chunk| Action::F { chunk, stage: 0 }).collect();
    want.push(Action::F {
        chunk: 10,
        stage: 7,
    });
    assert_eq!(head, want);
    // Rank 7 mirrors it with the second half of the micro-batches.
    assert_eq!(
        s.ranks[7][0],
        Action::F {
            chunk: 10,
            stage: 0
        }
    );
    assert_eq!(s.rank_of(10, 0), 7);
    // The steady state is overlapped pairs; the drain ends with deferred Ws.
    for (r, acts) in s.ranks.iter().enumerate() {
        assert!(
            acts.iter().any(|a| matches!(a, Action::FB { .. })),
            "rank {r}"
        );
        assert!(matches!(acts.last(), Some(Action::W { .. })), "rank {r}");
    }
    let v = build(Kind::DualPipeV, 4, 8).expect("valid");
    assert_eq!(v.rank_of(0, 3), 3);
    assert_eq!(v.rank_of(0, 4), 3);
    assert_eq!(v.rank_of(0, 7), 0);
}

#[test]
fn schedule_communication_cost_lengthens_the_step() {
    let s = build(Kind::OneF1B, 4, 8).expect("valid");
    let free = simulate(&s, &Costs::default()).expect("ok");
    let slow = simulate(
        &s,
        &Costs {
            comm: 0.5,
            ..Costs::default()
        },
    )
    .expect("ok");
    // At least every hop of the first forward and the last backward path pays the latency,
    // 2·(pp−1)·0.5 = 3; 1F1B's steady state also waits on round trips: measured +8 (16 hops).
    assert!(slow.makespan - free.makespan >= 3.0);
    assert_eq!(slow.makespan - free.makespan, 8.0);
}

#[test]
fn schedule_json_and_svg() {
    let s = build(Kind::DualPipe, 4, 8).expect("valid");
    let c = Costs::default();
    let t = simulate(&s, &c).expect("ok");
    let j = s.to_json(&t);
    assert_eq!(j["kind"], "dualpipe");
    assert_eq!(j["pp"], 4);
    assert_eq!(j["chunks"], 8);
    assert_eq!(j["ranks"].as_array().map(Vec::len), Some(4));
    assert_eq!(j["bubble"].as_array().map(Vec::len), Some(4));
    assert_eq!(j["makespan"], t.makespan);
    let first = &j["ranks"][0]["actions"][0];
    assert_eq!(first["op"], "F");
    assert_eq!(first["chunk"], 0);
    assert_eq!(first["stage"], 0);
    let fb = j["ranks"][0]["actions"]
        .as_array()
        .and_then(|a| a.iter().find(|x| x["op"] == "FB"))
        .expect("an FB action");
    assert!(fb["f"]["chunk"].is_u64() && fb["b"]["stage"].is_u64());
    let picture = svg::render(&s, &t, &c);
    assert!(picture.starts_with("<svg"));
    assert!(picture.trim_end().ends_with("</svg>"));
    let boxes = picture.matches("<rect").count();
    assert!(boxes >= s.ranks.iter().map(Vec::len).sum::<usize>());
}
