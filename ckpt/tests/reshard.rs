//! Loading a checkpoint saved with one expert-parallel layout onto others: saved with ep = 2
//! (two shards, routed experts split, dense tensors in both), loaded as ep = 1, ep = 4 and
//! dp = 2, every tensor and moment comes back bit-identical to the original.

use std::collections::BTreeMap;
use std::sync::Arc;

use flotilla_ckpt::reshard::{expert_owner, routed_expert};
use flotilla_ckpt::{CheckpointEngine, HostTensor, Layout, Snapshot, SnapshotMeta};
use flotilla_model::optim::{AdamWState, ParamState};
use flotilla_runtime::storage::sim::SimStorage;

const EXPERTS: usize = 8;
const LAYERS: usize = 2;

fn dense() -> Vec<String> {
    let mut v = vec![
        "model.embed_tokens.weight".to_string(),
        "model.norm.weight".into(),
    ];
    for l in 0..LAYERS {
        v.push(format!("model.layers.{l}.mlp.gate.weight"));
        v.push(format!("model.layers.{l}.mlp.gate.e_score_correction_bias"));
    }
    v
}

fn experts(ep: usize, ep_rank: usize) -> Vec<String> {
    let mut v = Vec::new();
    for l in 0..LAYERS {
        for e in 0..EXPERTS {
            if expert_owner(e, EXPERTS, ep) == ep_rank {
                for p in ["gate_proj", "up_proj", "down_proj"] {
                    v.push(format!("model.layers.{l}.mlp.experts.{e}.{p}.weight"));
                }
            }
        }
    }
    v
}

/// The global state: a distinct tensor per name, moments for all but the bias buffers.
/// Moments of a parameter: its step count, `exp_avg`, `exp_avg_sq`.
type MomentsOf = (u64, HostTensor, HostTensor);

fn global() -> (BTreeMap<String, HostTensor>, BTreeMap<String, MomentsOf>) {
    let mut params = BTreeMap::new();
    let mut moments = BTreeMap::new();
    let mut x = 0x1234_5678u32;
    let mut next = |n: usize| -> Vec<f32> {
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                f32::from_bits(x)
            })
            .collect()
    };
    for (i, name) in dense().into_iter().chain(experts(1, 0)).enumerate() {
        let shape = vec![3, 2 + i % 3];
        let n = shape.iter().product();
        params.insert(
            name.clone(),
            HostTensor::new(&name, shape.clone(), next(n)).expect("t"),
        );
        if !name.ends_with("bias") {
            let m = (
                i as u64 + 1,
                HostTensor::new(&name, shape.clone(), next(n)).expect("t"),
                HostTensor::new(&name, shape, next(n)).expect("t"),
            );
            moments.insert(name, m);
        }
    }
    (params, moments)
}

fn meta(rank: usize, layout: Layout) -> SnapshotMeta {
    SnapshotMeta {
        rank,
        layout,
        config_hash: "feed".into(),
    }
}

fn rank_snapshot(rank: usize, layout: Layout, names: &[String]) -> Snapshot {
    let (params, moments) = global();
    let mut s = Snapshot::new(meta(rank, layout), 4);
    let mut st = AdamWState {
        steps: 4,
        ..AdamWState::default()
    };
    for n in names {
        let t = &params[n];
        s.add_param(n, t.shape(), t.data().to_vec()).expect("param");
        if let Some((step, a, b)) = moments.get(n) {
            let p = ParamState {
                step: *step,
                exp_avg: a.data().to_vec(),
                exp_avg_sq: b.data().to_vec(),
            };
            st.params.insert(n.clone(), p);
        }
    }
    s.set_optimizer(st).expect("optimizer");
    s.data_cursor = vec![9, 9];
    s
}

fn names_of(ep: usize, ep_rank: usize) -> Vec<String> {
    dense().into_iter().chain(experts(ep, ep_rank)).collect()
}

#[tokio::test(start_paused = true)]
async fn a_checkpoint_saved_with_ep2_loads_as_ep1_ep4_and_dp2() {
    assert_eq!(
        routed_expert("model.layers.3.mlp.experts.7.gate_proj.weight"),
        Some((3, 7))
    );
    assert_eq!(routed_expert("model.layers.3.mlp.gate.weight"), None);
    let storage = Arc::new(SimStorage::unlimited());
    let engine = CheckpointEngine::with_root(storage, "ckpt", 2);
    let saved = Layout {
        world_size: 2,
        pp: 1,
        ep: 2,
        dp: 1,
        stage_layers: Vec::new(),
    };
    let shards: Vec<Snapshot> = (0..2)
        .map(|r| rank_snapshot(r, saved.clone(), &names_of(2, r)))
        .collect();
    assert_ne!(shards[0].params.len(), 0);
    assert!(!shards[0].params.keys().any(|k| k.contains("experts.4.")));
    engine.save_sync(shards).await.expect("save");

    // Every target layout: (ep, dp) with its ranks' names; each rank's state must equal the
    // state a run of that layout would have saved itself.
    for (ep, dp) in [(1, 1), (4, 1), (1, 2)] {
        let layout = Layout {
            world_size: ep * dp,
            pp: 1,
            ep,
            dp,
            stage_layers: Vec::new(),
        };
        for rank in 0..ep * dp {
            let names = names_of(ep, rank % ep);
            let got = engine
                .assemble(4, meta(rank, layout.clone()), &names)
                .await
                .expect("assemble");
            let want = rank_snapshot(rank, layout.clone(), &names);
            assert_eq!(got, want, "ep={ep} dp={dp} rank {rank}");
        }
    }
    let missing = engine
        .assemble(
            4,
            meta(0, saved),
            &["model.layers.9.mlp.gate.weight".into()],
        )
        .await
        .expect_err("no such tensor");
    assert!(missing.to_string().contains("no shard holds"), "{missing}");
}
