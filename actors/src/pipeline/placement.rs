//! Placement: which stages, layers and experts each rank holds, and which ranks hold each tensor.
//!
//! The grid is `runtime::topology` (EP fastest, then DP, PP slowest). The model is cut into
//! `schedule.stages()` stages: evenly ([`StageSpec::split`]), or with the decoder layers per
//! stage that `[parallel] stage_layers` lists ([`StageSpec::split_layers`]). Pipeline rank `p`
//! holds the stages the schedule places on it (one for GPipe/1F1B/ZB1P, two for DualPipe — a
//! second copy of the parameters, as the report says — and two for DualPipeV). Within a stage
//! every tensor is *dense* (held by every data rank: all `dp × ep` of them) except routed
//! experts: expert `e` of a MoE layer is held by EP index `e / (E / ep)` only. The embedding is
//! held by the stage with the embedding and by the head stage (the MTP modules embed too), whose
//! gradients are summed.
//!
//! A tensor's **holders** are every global rank that has it; its gradient is summed over exactly
//! that set, and its canonical holder (the lowest rank) counts it once in the global grad norm
//! and the job's parameter hash. Every rank computes the same placement from the config alone.

use std::collections::BTreeMap;

use flotilla_model::{ModelConfig, StageSpec};
use flotilla_runtime::topology::{Coord, Topology};

use crate::schedule::Schedule;

/// Where everything of one job lives.
#[derive(Debug, Clone)]
pub struct Placement {
    pub topo: Topology,
    pub schedule: Schedule,
    /// Every stage's slice of the model.
    pub specs: Vec<StageSpec>,
    /// Routed experts per MoE layer.
    pub n_experts: usize,
    /// Decoder layers (MTP blocks have layer indices from here on).
    pub n_layers: usize,
    /// The stages each pipeline rank holds (computed once: every tensor's holders ask).
    stages_by_pp: Vec<Vec<usize>>,
}

/// Which parts of the model a tensor name belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Embed,
    Layer {
        layer: usize,
        expert: Option<usize>,
    },
    /// Final norm, `lm_head` and the MTP modules (their routed experts are split too).
    Head {
        expert: Option<usize>,
    },
}

fn parse(name: &str) -> Part {
    let expert = name
        .split(".experts.")
        .nth(1)
        .and_then(|rest| rest.split('.').next())
        .and_then(|e| e.parse().ok());
    if name.starts_with("model.embed_tokens.") {
        Part::Embed
    } else if let Some(rest) = name.strip_prefix("model.layers.") {
        match rest.split('.').next().and_then(|l| l.parse().ok()) {
            Some(layer) => Part::Layer { layer, expert },
            None => Part::Head { expert },
        }
    } else {
        Part::Head { expert }
    }
}

impl Placement {
    /// The placement of `schedule` over `topo`. `stage_layers` lists the decoder layers of each
    /// of the schedule's stages, in order (`[parallel] stage_layers`); empty means the even
    /// split. A list that does not fit the schedule or the model is an error naming the key.
    pub fn new(
        cfg: &ModelConfig,
        topo: Topology,
        schedule: Schedule,
        stage_layers: &[usize],
    ) -> Result<Placement, String> {
        let specs = if stage_layers.is_empty() {
            StageSpec::split(cfg, schedule.stages())
        } else if stage_layers.len() != schedule.stages() {
            let n = stage_layers.len();
            return Err(format!(
                "parallel.stage_layers: {n} {}, but the schedule cuts the model into {} stages",
                if n == 1 { "entry" } else { "entries" },
                schedule.stages()
            ));
        } else {
            StageSpec::split_layers(cfg, stage_layers)
                .map_err(|e| format!("parallel.stage_layers: {e}"))?
        };
        let stages_by_pp = (0..topo.pp)
            .map(|p| {
                (0..schedule.stages())
                    .filter(|&s| (0..schedule.chunks).any(|c| schedule.rank_of(c, s) == p))
                    .collect()
            })
            .collect();
        Ok(Placement {
            topo,
            schedule,
            specs,
            n_experts: cfg.n_routed_experts,
            n_layers: cfg.num_hidden_layers,
            stages_by_pp,
        })
    }

    /// Global ranks in the job.
    pub fn world(&self) -> usize {
        self.topo.world()
    }

    /// Ranks that process distinct data (the attention's data parallelism): `dp · ep`.
    pub fn data_ranks(&self) -> usize {
        self.topo.dp * self.topo.ep
    }

    /// This rank's data-rank index (which slice of each global batch it trains on).
    pub fn data_rank(&self, rank: usize) -> usize {
        let c = self.topo.coord(rank);
        c.dp * self.topo.ep + c.ep
    }

    /// Stages pipeline rank `p` holds, in ascending order.
    pub fn stages_of_pp(&self, p: usize) -> &[usize] {
        self.stages_by_pp.get(p).map_or(&[], Vec::as_slice)
    }

    /// Stages global rank `rank` holds.
    pub fn stages_of(&self, rank: usize) -> &[usize] {
        self.stages_of_pp(self.topo.coord(rank).pp)
    }

    /// The global rank that runs `(chunk, stage)` in the pipeline of `rank` (same dp and ep).
    pub fn peer_for(&self, rank: usize, chunk: usize, stage: usize) -> usize {
        let c = self.topo.coord(rank);
        self.topo.rank_of(Coord {
            pp: self.schedule.rank_of(chunk, stage),
            ..c
        })
    }

    /// The stages a tensor belongs to (two for the embedding when it is split off the head).
    fn stages_of_part(&self, part: &Part) -> Vec<usize> {
        let last = self.specs.len() - 1;
        match part {
            Part::Embed => {
                let mut v = vec![0, last];
                v.dedup();
                v
            }
            Part::Layer { layer, .. } if *layer >= self.n_layers => vec![last],
            Part::Layer { layer, .. } => self
                .specs
                .iter()
                .position(|s| s.layers.contains(layer))
                .into_iter()
                .collect(),
            Part::Head { .. } => vec![last],
        }
    }

    /// The EP index that holds routed expert `e` (all experts when ep = 1).
    pub fn ep_of_expert(&self, e: usize) -> usize {
        let per = (self.n_experts / self.topo.ep).max(1);
        (e / per).min(self.topo.ep - 1)
    }

    /// The stages of this rank that a tensor's gradient comes from (empty: not held here).
    pub fn local_stages_of(&self, rank: usize, name: &str) -> Vec<usize> {
        let part = parse(name);
        let expert = match &part {
            Part::Layer { expert, .. } | Part::Head { expert } => *expert,
            Part::Embed => None,
        };
        if let Some(e) = expert
            && self.ep_of_expert(e) != self.topo.coord(rank).ep
        {
            return Vec::new();
        }
        let mine = self.stages_of(rank);
        self.stages_of_part(&part)
            .into_iter()
            .filter(|s| mine.contains(s))
            .collect()
    }

    /// Whether `rank` holds the tensor `name`.
    pub fn holds(&self, rank: usize, name: &str) -> bool {
        !self.local_stages_of(rank, name).is_empty()
    }

    /// Every global rank holding `name`, ascending (the name is parsed once: this runs for
    /// every tensor of a model of thousands).
    pub fn holders(&self, name: &str) -> Vec<usize> {
        let part = parse(name);
        let ep = match &part {
            Part::Layer { expert, .. } | Part::Head { expert } => {
                expert.map(|e| self.ep_of_expert(e))
            }
            Part::Embed => None,
        };
        let stages = self.stages_of_part(&part);
        (0..self.world())
            .filter(|&r| {
                ep.is_none_or(|e| self.topo.coord(r).ep == e)
                    && self.stages_of(r).iter().any(|s| stages.contains(s))
            })
            .collect()
    }

    /// The distinct holder sets of `names` (sorted), each with the names it covers: every rank
    /// computes the same list, so its index can name a communicator channel.
    pub fn holder_sets<'a>(
        &self,
        names: impl IntoIterator<Item = &'a str>,
    ) -> Vec<(Vec<usize>, Vec<String>)> {
        let mut sets: BTreeMap<Vec<usize>, Vec<String>> = BTreeMap::new();
        for n in names {
            sets.entry(self.holders(n)).or_default().push(n.to_string());
        }
        sets.into_iter().filter(|(h, _)| !h.is_empty()).collect()
    }

    /// The host of every routed expert as seen from `rank`'s EP group.
    pub fn expert_hosts(&self, rank: usize) -> Vec<usize> {
        let group = self.topo.ep_group(rank);
        (0..self.n_experts)
            .map(|e| self.topo.host_of(group[self.ep_of_expert(e)]))
            .collect()
    }

    /// Node-limited routing (report §2.1.2: each token goes to at most M hosts). The router's
    /// group-limited top-k picks `topk_group` of `n_group` groups of consecutive experts; when
    /// every group lies on one host, a token's experts lie on at most `topk_group` hosts, so
    /// group-limited routing *is* node-limited routing (as in DeepSeek-V3, whose 8 groups are
    /// its 8 nodes). Checks that every group stays on one host of every EP group and that
    /// `topk_group <= max_hosts`; an EP group within one host needs nothing.
    pub fn check_node_limited(
        &self,
        n_group: usize,
        topk_group: usize,
        max_hosts: usize,
    ) -> Result<(), String> {
        let per_group = self.n_experts / n_group.max(1);
        for rank in 0..self.world() {
            let hosts = self.expert_hosts(rank);
            let spanned = {
                let mut h = hosts.clone();
                h.sort_unstable();
                h.dedup();
                h.len()
            };
            if spanned == 1 {
                continue;
            }
            for g in 0..n_group {
                let lo = g * per_group;
                let on = &hosts[lo..(lo + per_group).min(hosts.len())];
                if on.iter().any(|h| *h != on[0]) {
                    return Err(format!(
                        "node-limited routing: router group {g} (experts {lo}..{}) spans hosts \
                         {on:?}; with the EP group of rank {rank} over {spanned} hosts, \
                         model.n_group must be a multiple of {spanned}",
                        lo + per_group
                    ));
                }
            }
            if topk_group > max_hosts && spanned > max_hosts {
                return Err(format!(
                    "node-limited routing: model.topk_group = {topk_group} lets a token reach \
                     more than parallel.max_hosts_per_token = {max_hosts} of the {spanned} hosts \
                     its EP group spans"
                ));
            }
        }
        Ok(())
    }

    /// Routed-expert layer indices (decoder and MTP) that `rank` runs forward for: the MoE
    /// layers of its stages. Used to keep only this rank's share of the router-bias update.
    pub fn layer_is_local(&self, rank: usize, layer: usize) -> bool {
        let stages = self.stages_of(rank);
        let last = self.specs.len() - 1;
        if layer >= self.n_layers {
            return stages.contains(&last);
        }
        stages
            .iter()
            .any(|&s| self.specs[s].layers.contains(&layer))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedule::{Kind, build};

    fn placement(kind: Kind, pp: usize, ep: usize, dp: usize, chunks: usize) -> Placement {
        let mut cfg = ModelConfig::tiny();
        cfg.num_hidden_layers = 4;
        let topo = Topology::new(1, pp * ep * dp, pp, ep, dp).expect("topology");
        Placement::new(&cfg, topo, build(kind, pp, chunks).expect("schedule"), &[])
            .expect("placement")
    }

    #[test]
    fn names_parse_into_parts() {
        assert_eq!(parse("model.embed_tokens.weight"), Part::Embed);
        assert_eq!(
            parse("model.layers.3.mlp.experts.7.up_proj.weight"),
            Part::Layer {
                layer: 3,
                expert: Some(7)
            }
        );
        assert_eq!(
            parse("model.layers.1.self_attn.q_a_proj.weight"),
            Part::Layer {
                layer: 1,
                expert: None
            }
        );
        assert_eq!(parse("lm_head.weight"), Part::Head { expert: None });
    }

    #[test]
    fn dualpipe_ranks_hold_mirrored_stages_and_experts_split_by_ep() {
        let p = placement(Kind::DualPipe, 4, 2, 1, 8);
        assert_eq!(p.stages_of_pp(0), vec![0, 3]);
        assert_eq!(p.stages_of_pp(1), vec![1, 2]);
        // Expert 0 of layer 1 (stage 1) lives on EP index 0 of pipeline ranks 1 and 2.
        let name = "model.layers.1.mlp.experts.0.up_proj.weight";
        assert_eq!(p.holders(name), vec![2, 4]);
        // The embedding: stage 0 and the head stage 3, both on pipeline ranks 0 and 3.
        assert_eq!(p.holders("model.embed_tokens.weight"), vec![0, 1, 6, 7]);
    }

    #[test]
    fn node_limited_routing_keeps_each_token_on_at_most_m_hosts() {
        use flotilla_model::layers::Ctx;
        use flotilla_model::layers::router::Router;
        use flotilla_model::{CpuDevice, Device};

        // ep = 4 over two hosts of two ranks: experts 0..4 on host 0, 4..8 on host 1.
        let mut cfg = ModelConfig::tiny();
        cfg.n_routed_experts = 8;
        cfg.n_group = 4;
        cfg.topk_group = 2;
        cfg.num_experts_per_tok = 3;
        let topo = Topology::new(2, 2, 1, 4, 1).expect("topology");
        let p = Placement::new(
            &cfg,
            topo.clone(),
            build(Kind::OneF1B, 1, 1).expect("schedule"),
            &[],
        )
        .expect("placement");
        assert_eq!(p.expert_hosts(0), vec![0, 0, 0, 0, 1, 1, 1, 1]);
        assert!(p.check_node_limited(4, 2, 2).is_ok());
        assert!(p.check_node_limited(4, 2, 1).is_err(), "topk_group above M");
        assert!(
            p.check_node_limited(1, 1, 2).is_err(),
            "a group spanning both hosts"
        );

        let dev = CpuDevice::new(1);
        let router = Router::init(&dev, &cfg, "r.", 3);
        let n = 256;
        let x: Vec<f32> = (0..n * cfg.hidden_size)
            .map(|i| ((i * 7919 % 1013) as f32 / 1013.0 - 0.5) * 4.0)
            .collect();
        let x = dev.upload(&[n, cfg.hidden_size], &x);
        let rope = dev.empty(&[0]);
        let ctx = Ctx {
            dev: &dev,
            batch: 1,
            seq: n,
            rope: &rope,
            balance_alpha: 0.0,
        };
        let (_, c) = router.forward(&ctx, &x);
        let hosts = p.expert_hosts(0);
        let mut most = 0;
        for t in c.topk.chunks(cfg.num_experts_per_tok) {
            let mut h: Vec<usize> = t.iter().map(|&e| hosts[e as usize]).collect();
            h.sort_unstable();
            h.dedup();
            most = most.max(h.len());
        }
        assert_eq!(most, 2, "some token uses both hosts, none more than M = 2");
        // With M = 1 (topk_group = 1, so top-2 within one group of two) every token stays on
        // one host.
        let mut one = cfg.clone();
        one.topk_group = 1;
        one.num_experts_per_tok = 2;
        let router = Router::init(&dev, &one, "r.", 3);
        assert!(p.check_node_limited(4, 1, 1).is_ok());
        let (_, c) = router.forward(&ctx, &x);
        for t in c.topk.chunks(one.num_experts_per_tok) {
            assert!(t.iter().all(|&e| hosts[e as usize] == hosts[t[0] as usize]));
        }
    }

    #[test]
    fn one_f_one_b_holds_one_stage_per_rank() {
        let p = placement(Kind::OneF1B, 2, 1, 2, 4);
        assert_eq!(p.stages_of_pp(1), vec![1]);
        assert_eq!(p.holders("lm_head.weight"), vec![2, 3]);
        assert_eq!(p.holders("model.embed_tokens.weight"), vec![0, 1, 2, 3]);
        assert_eq!(p.data_rank(3), 1);
    }

    #[test]
    fn stage_layers_place_the_layers_and_their_experts() {
        let mut cfg = ModelConfig::tiny();
        cfg.num_hidden_layers = 4;
        let topo = Topology::new(1, 4, 2, 2, 1).expect("topology");
        let sched = || build(Kind::OneF1B, 2, 4).expect("schedule");
        let p = Placement::new(&cfg, topo.clone(), sched(), &[3, 1]).expect("placement");
        let layers: Vec<_> = p.specs.iter().map(|s| s.layers.clone()).collect();
        assert_eq!(layers, [0..3, 3..4]);
        // Layer 2 (MoE) is on stage 0 now: pipeline rank 0, expert 0 on its EP index 0.
        assert_eq!(
            p.holders("model.layers.2.mlp.experts.0.up_proj.weight"),
            vec![0]
        );
        assert_eq!(
            p.holders("model.layers.2.self_attn.kv_a_proj_with_mqa.weight"),
            vec![0, 1]
        );
        assert!(p.layer_is_local(1, 2) && !p.layer_is_local(2, 2));
        // Empty is the even split.
        let even = Placement::new(&cfg, topo.clone(), sched(), &[]).expect("placement");
        assert_eq!(even.specs, StageSpec::split(&cfg, 2));
        for (bad, why) in [
            (
                &[4][..],
                "1 entry, but the schedule cuts the model into 2 stages",
            ),
            (
                &[3, 2][..],
                "the stages hold 5 decoder layers, the model has 4",
            ),
        ] {
            match Placement::new(&cfg, topo.clone(), sched(), bad) {
                Ok(_) => panic!("{bad:?} accepted"),
                Err(e) => assert_eq!(e, format!("parallel.stage_layers: {why}")),
            }
        }
    }
}
