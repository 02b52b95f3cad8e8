//! Topology: where each rank sits (host, local index) and which parallel groups it belongs to.
//!
//! Ranks are laid out with expert parallelism fastest, then data parallelism, then pipeline
//! parallelism slowest: `rank = pp_idx·(dp·ep) + dp_idx·ep + ep_idx`. With ranks filling hosts
//! in order, an EP group stays inside a host whenever `ep` divides the ranks per host (the
//! all-to-all is the heaviest traffic), and pipeline stages, which exchange only activations,
//! span hosts.

use serde::{Deserialize, Serialize};

use crate::fabric::Rank;

/// Why a topology cannot be built.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TopologyError {
    #[error("parallel degrees must be at least 1 (pp={pp}, ep={ep}, dp={dp})")]
    ZeroDegree { pp: usize, ep: usize, dp: usize },
    #[error(
        "world size {world} (hosts {hosts} × ranks per host {per_host}) != pp·ep·dp = {product}"
    )]
    WorldMismatch {
        world: usize,
        hosts: usize,
        per_host: usize,
        product: usize,
    },
}

/// A rank's coordinates in the parallel grid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Coord {
    pub pp: usize,
    pub dp: usize,
    pub ep: usize,
}

/// The job's layout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Topology {
    pub hosts: usize,
    pub ranks_per_host: usize,
    pub pp: usize,
    pub ep: usize,
    pub dp: usize,
}

impl Topology {
    /// Build and check a layout.
    pub fn new(
        hosts: usize,
        ranks_per_host: usize,
        pp: usize,
        ep: usize,
        dp: usize,
    ) -> Result<Self, TopologyError> {
        if pp == 0 || ep == 0 || dp == 0 {
            return Err(TopologyError::ZeroDegree { pp, ep, dp });
        }
        let world = hosts * ranks_per_host;
        if world != pp * ep * dp {
            return Err(TopologyError::WorldMismatch {
                world,
                hosts,
                per_host: ranks_per_host,
                product: pp * ep * dp,
            });
        }
        Ok(Self {
            hosts,
            ranks_per_host,
            pp,
            ep,
            dp,
        })
    }

    /// One rank, one host.
    pub fn single() -> Self {
        Self {
            hosts: 1,
            ranks_per_host: 1,
            pp: 1,
            ep: 1,
            dp: 1,
        }
    }

    pub fn world(&self) -> usize {
        self.hosts * self.ranks_per_host
    }

    pub fn coord(&self, rank: Rank) -> Coord {
        Coord {
            ep: rank % self.ep,
            dp: (rank / self.ep) % self.dp,
            pp: rank / (self.ep * self.dp),
        }
    }

    pub fn rank_of(&self, c: Coord) -> Rank {
        c.pp * self.dp * self.ep + c.dp * self.ep + c.ep
    }

    pub fn host_of(&self, rank: Rank) -> usize {
        rank / self.ranks_per_host
    }

    pub fn local_index(&self, rank: Rank) -> usize {
        rank % self.ranks_per_host
    }

    /// Ranks on `host`, in order.
    pub fn ranks_on_host(&self, host: usize) -> Vec<Rank> {
        let lo = host * self.ranks_per_host;
        (lo..lo + self.ranks_per_host).collect()
    }

    /// The pipeline group of `rank` (same dp and ep index), ordered by stage.
    pub fn pp_group(&self, rank: Rank) -> Vec<Rank> {
        let c = self.coord(rank);
        (0..self.pp)
            .map(|pp| self.rank_of(Coord { pp, ..c }))
            .collect()
    }

    /// The expert-parallel group of `rank` (same stage and dp index).
    pub fn ep_group(&self, rank: Rank) -> Vec<Rank> {
        let c = self.coord(rank);
        (0..self.ep)
            .map(|ep| self.rank_of(Coord { ep, ..c }))
            .collect()
    }

    /// The data-parallel group of `rank` for expert parameters (same stage and ep index).
    pub fn dp_group(&self, rank: Rank) -> Vec<Rank> {
        let c = self.coord(rank);
        (0..self.dp)
            .map(|dp| self.rank_of(Coord { dp, ..c }))
            .collect()
    }

    /// Every rank that holds a replica of `rank`'s dense (non-expert) parameters: its stage's
    /// whole dp × ep slab. Dense gradients are reduced over this group.
    pub fn dense_replica_group(&self, rank: Rank) -> Vec<Rank> {
        let c = self.coord(rank);
        let lo = c.pp * self.dp * self.ep;
        (lo..lo + self.dp * self.ep).collect()
    }

    /// Hosts spanned by a group of ranks, sorted and deduplicated.
    pub fn hosts_of(&self, ranks: &[Rank]) -> Vec<usize> {
        let mut h: Vec<usize> = ranks.iter().map(|&r| self.host_of(r)).collect();
        h.sort_unstable();
        h.dedup();
        h
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coords_round_trip_and_groups_partition_the_world() {
        let t = Topology::new(2, 4, 2, 2, 2).expect("valid");
        for r in 0..t.world() {
            assert_eq!(t.rank_of(t.coord(r)), r);
            assert!(t.pp_group(r).contains(&r));
            assert!(t.ep_group(r).contains(&r));
            assert!(t.dp_group(r).contains(&r));
        }
        assert_eq!(t.ep_group(5), vec![4, 5]);
        assert_eq!(t.dp_group(5), vec![5, 7]);
        assert_eq!(t.pp_group(5), vec![1, 5]);
        assert_eq!(t.dense_replica_group(5), vec![4, 5, 6, 7]);
        // EP groups stay on one host; the pipeline spans hosts.
        assert_eq!(t.hosts_of(&t.ep_group(5)), vec![1]);
        assert_eq!(t.hosts_of(&t.pp_group(5)), vec![0, 1]);
    }

    #[test]
    fn mismatched_world_is_refused() {
        assert_eq!(
            Topology::new(1, 3, 2, 1, 1),
            Err(TopologyError::WorldMismatch {
                world: 3,
                hosts: 1,
                per_host: 3,
                product: 2
            })
        );
        assert!(matches!(
            Topology::new(1, 1, 0, 1, 1),
            Err(TopologyError::ZeroDegree { .. })
        ));
    }
}
