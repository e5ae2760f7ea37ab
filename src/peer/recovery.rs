//! `peer --force-new-cluster`: recovery when a majority of the voters is lost for good.
//!
//! Before the core starts, the shell appends one configuration entry to the WAL that makes
//! this peer the only voter (learners stay learners), in a term above every term it has seen,
//! and fsyncs it. A configuration is in force as soon as it is in the log (thesis §4.1), so the
//! restored core counts only itself: it elects itself, and its first entry as leader commits the
//! configuration and the whole log before it. The core stays pure: it sees an ordinary log.
//! Entries only the lost peers had are lost; nothing this peer holds is dropped.

use crate::config::PeerConfig;
use crate::raft::{Entry, HardState, Member, MemberRole, Membership, Payload};
use crate::storage::{Disk, Restored};

/// The configuration in force in `restored`, with `bootstrap` the one before any in the log.
fn in_force(restored: &Restored, bootstrap: &Membership) -> Membership {
    let from_log = restored
        .entries
        .iter()
        .rev()
        .find_map(|e| match &e.payload {
            Payload::Config(m) => Some(m.clone()),
            _ => None,
        });
    from_log
        .or_else(|| {
            restored
                .snapshot
                .as_ref()
                .map(|(s, _)| s.membership.clone())
        })
        .unwrap_or_else(|| bootstrap.clone())
}

/// `current` with `config`'s peer its only voter: other voters go, learners stay.
pub fn sole_voter(config: &PeerConfig, current: &Membership) -> Membership {
    let me = Member {
        id: config.node_id,
        address: current
            .members
            .iter()
            .find(|m| m.id == config.node_id)
            .map_or_else(
                || format!("{}:{}", config.host, config.port),
                |m| m.address.clone(),
            ),
        role: MemberRole::Voter,
    };
    let learners = current
        .members
        .iter()
        .filter(|m| m.role == MemberRole::Learner && m.id != config.node_id)
        .cloned();
    Membership::new(std::iter::once(me).chain(learners).collect())
}

/// Makes this peer the only voter, durably, and updates `restored` to match what the WAL now
/// holds. Does nothing (but say so) if it already is.
pub fn force_new_cluster(
    config: &PeerConfig,
    disk: &mut Disk,
    restored: &mut Restored,
    bootstrap: &Membership,
) -> Result<(), String> {
    let current = in_force(restored, bootstrap);
    let target = sole_voter(config, &current);
    if current == target {
        log::warn!(
            "{}: --force-new-cluster: already the only voter ({}); nothing to change",
            config.name,
            current.describe()
        );
        return Ok(());
    }
    let last = restored.entries.last().map_or(restored.base.0, |e| e.index);
    // A term no lost peer can have used with this index: (index, term) stays unique.
    let term = restored.hard_state.term + 1;
    let entry = Entry {
        index: last + 1,
        term,
        payload: Payload::Config(target.clone()),
    };
    let hard_state = HardState {
        term,
        vote: None,
        commit: restored.hard_state.commit,
    };
    for line in [
        "**********************************************************************".to_string(),
        format!(
            "{}: --force-new-cluster: making node {} the ONLY voter of its cluster",
            config.name, config.node_id
        ),
        format!(
            "configuration in force was {}; now {} (entry {} of term {term})",
            current.describe(),
            target.describe(),
            entry.index
        ),
        format!(
            "the whole log (to index {last}, committed to {}) is kept and will commit; entries only the lost peers had are gone",
            hard_state.commit
        ),
        "the lost peers must never start again on their old data: add new peers instead".into(),
        "**********************************************************************".into(),
    ] {
        log::warn!("{line}");
    }
    disk.wal
        .persist(Some(&hard_state), std::slice::from_ref(&entry))
        .map_err(|e| {
            format!(
                "{}: --force-new-cluster: cannot write the configuration entry to the WAL in {}: {e}",
                config.name,
                config.data_dir.display()
            )
        })?;
    restored.hard_state = hard_state;
    restored.entries.push(entry);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft::MemberRole::{Learner, Voter};

    fn membership(members: &[(u64, MemberRole)]) -> Membership {
        Membership::new(
            members
                .iter()
                .map(|&(id, role)| Member {
                    id,
                    address: format!("10.0.0.{id}:3000"),
                    role,
                })
                .collect(),
        )
    }

    #[test]
    fn the_survivor_becomes_the_only_voter_and_learners_stay() {
        let dir = std::env::temp_dir();
        let text = format!(
            r#"{{"name":"peer2","node_ID":2,"host":"127.0.0.1","port":4000,"data_dir":{:?},
                "other_peers":[{{"node_ID":1,"host":"127.0.0.1","port":4001}}]}}"#,
            dir.join("unused")
        );
        let path = dir.join(format!("raft-recovery-{}.json", std::process::id()));
        std::fs::write(&path, text).unwrap();
        let config = PeerConfig::load(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        let before = membership(&[(1, Voter), (2, Voter), (3, Voter), (4, Learner)]);
        let after = sole_voter(&config, &before);
        // Its address as the cluster knows it, not as this config says.
        assert_eq!(after, membership(&[(2, Voter), (4, Learner)]));
        assert_eq!(sole_voter(&config, &after), after);
        // A learner survivor becomes the voter.
        let learner = membership(&[(1, Voter), (2, Learner)]);
        assert_eq!(sole_voter(&config, &learner), membership(&[(2, Voter)]));
    }
}
