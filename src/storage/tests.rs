//! The disk's ordering (a snapshot durable before the core hears of it, the WAL rotated and
//! its segments deleted only after), installs that wait for a snapshot in flight, and what a
//! full disk or a failed fsync does, on the simulated filesystem.

use super::fs::Fs;
use super::simfs::{Faults, SimFs};
use super::*;
use crate::raft::{record_of, Membership, Payload};

const DIR: &str = "/data";

fn sim() -> (SimFs, Fs) {
    let sim = SimFs::new(7);
    (sim.clone(), Fs::Sim(sim))
}

fn open(fs: &Fs, entries: u64, trailing: u64) -> (Disk, Restored) {
    let (disk, restored) = Disk::open_in(fs, Path::new(DIR), 1, entries, trailing).unwrap();
    disk.settle().unwrap();
    (disk, restored)
}

fn entry(index: Index, size: usize) -> Entry {
    Entry {
        index,
        term: 1,
        payload: Payload::Data {
            client: 1,
            seq: index,
            data: "x".repeat(size),
        },
    }
}

fn hs(commit: Index) -> HardState {
    HardState {
        term: 1,
        vote: Some(1),
        commit,
    }
}

fn state(index: Index) -> SnapshotState {
    SnapshotState {
        index,
        term: 1,
        membership: Membership::default(),
        config_at: (0, 0),
        removed: Vec::new(),
        sessions: Vec::new(),
        users: Vec::new(),
    }
}

/// A leader's snapshot at 30 (entries of 10 bytes), from a store of its own on a filesystem of
/// its own: its store, to read chunks from, and the snapshot's ID.
fn leader_snapshot_at_30() -> (Store, SnapshotId) {
    let leader = Fs::Sim(SimFs::new(3));
    let (mut store, _) = Store::open_in(&leader, Path::new("/leader")).unwrap();
    let records: Vec<_> = (1..=30).map(|i| record_of(&entry(i, 10), false)).collect();
    store.append(&records).unwrap();
    let id = store.write_snapshot(&state(30)).unwrap();
    (store, id)
}

/// The leader's snapshot at 30 as one chunk from node 2.
fn whole_snapshot_at_30() -> ChunkWrite {
    let (mut store, id) = leader_snapshot_at_30();
    let (data, crc) = store::encode_chunk(&store.read_chunk(&id, 0, id.total_len()).unwrap());
    ChunkWrite {
        from: 2,
        snapshot: id,
        offset: 0,
        data,
        crc,
    }
}

/// Persists and applies entries `from..=to` of `size` bytes each.
fn write(disk: &mut Disk, from: Index, to: Index, size: usize) {
    let entries: Vec<Entry> = (from..=to).map(|i| entry(i, size)).collect();
    disk.persist_wal(Some(&hs(to)), &entries).unwrap();
    let records: Vec<_> = entries.iter().map(|e| record_of(e, false)).collect();
    disk.apply(&records).unwrap();
}

/// The position of the first journal line containing `what`.
fn at(journal: &[String], what: &str) -> usize {
    journal
        .iter()
        .position(|l| l.contains(what))
        .unwrap_or_else(|| panic!("no {what:?} in {journal:#?}"))
}

#[test]
fn a_snapshot_is_durable_before_the_core_hears_of_it_and_the_wal_is_cut_after() {
    let (sim, fs) = sim();
    let (mut disk, _) = open(&fs, 10, 0);
    // Over a segment's worth, so that compaction rotates the WAL and deletes the old one.
    write(&mut disk, 1, 300, 4000);
    assert!(disk.snapshot_due(300));
    sim.start_journal();
    disk.start_snapshot(&state(300)).unwrap();
    disk.settle().unwrap();
    let id = disk.snapshot_written().unwrap().expect("written");
    sim.mark("core told");
    disk.compact_wal(&hs(300), (300, 1), id.index).unwrap();
    disk.settle().unwrap();
    // The rotation took the prepared segment: its first frame goes out with the next persist,
    // and the old segment goes only once that is durable.
    assert!(!sim.journal().iter().any(|l| l == "unlink /data/wal"));
    write(&mut disk, 301, 301, 10);
    disk.compact_wal(&hs(301), (301, 1), id.index).unwrap();
    disk.settle().unwrap();
    let j = sim.journal();
    let records = at(&j, "sync /data/store.1/records");
    let index = at(&j, "sync /data/store.1/index");
    let meta = at(&j, "rename /data/store.1/snapshot.json.tmp");
    let meta_dir = at(&j, "syncdir /data/store.1");
    let told = at(&j, "core told");
    let rotated = at(&j, "sync /data/wal.1");
    let deleted = j
        .iter()
        .position(|l| l == "unlink /data/wal")
        .expect("deleted");
    assert!(records < meta && index < meta && meta < meta_dir, "{j:#?}");
    assert!(
        meta_dir < told && told < rotated && rotated < deleted,
        "{j:#?}"
    );
    // The segment deleted is the old one (its deletion needs no directory sync: see
    // `wal::delete_segments`).
    assert_eq!(j[deleted], "unlink /data/wal", "{j:#?}");
}

#[test]
fn an_install_waits_for_a_snapshot_in_flight() {
    let (sim, fs) = sim();
    let (mut disk, _) = open(&fs, 10, 0);
    write(&mut disk, 1, 20, 10);
    let (mut store, id) = leader_snapshot_at_30();
    let bytes = store.read_chunk(&id, 0, id.total_len()).unwrap();
    let (data, crc) = store::encode_chunk(&bytes);

    sim.start_journal();
    disk.start_snapshot(&state(20)).unwrap();
    let w = ChunkWrite {
        from: 2,
        snapshot: id,
        offset: 0,
        data,
        crc,
    };
    match disk.stage(&w, hs(20)).unwrap() {
        Staged::Installed { state, .. } => assert_eq!(state.index, 30),
        Staged::Partial { have } => panic!("only {have} bytes staged"),
    }
    let j = sim.journal();
    let snapshot_done = at(&j, "syncdir /data/store.1");
    let installed = at(&j, "rename /data/install /data/store.2");
    assert!(snapshot_done < installed, "{j:#?}");
    // The snapshot of the replaced store is not announced.
    assert_eq!(disk.snapshot_written().unwrap(), None);
    let (_, restored) = {
        drop(disk);
        open(&fs, 10, 0)
    };
    assert_eq!(restored.snapshot.map(|(s, _)| s.index), Some(30));
}

#[test]
fn a_full_disk_at_an_installs_last_step_keeps_the_old_store_and_is_retried() {
    let (sim, fs) = sim();
    let (mut disk, _) = open(&fs, 1_000_000, 0);
    write(&mut disk, 1, 5, 10);
    let (mut store, id) = leader_snapshot_at_30();
    let mut chunk = |offset: u64, len: u64| {
        let (data, crc) = store::encode_chunk(&store.read_chunk(&id, offset, len).unwrap());
        ChunkWrite {
            from: 2,
            snapshot: id,
            offset,
            data,
            crc,
        }
    };
    let staged = disk.stage(&chunk(0, id.records_len), hs(5)).unwrap();
    assert!(matches!(staged, Staged::Partial { have } if have == id.records_len));

    // Room for the staged meta file, none for the new contents of `store.current`.
    let meta = chunk(id.records_len, id.meta_len);
    sim.set_faults(Faults {
        capacity: Some(sim.used() + id.meta_len + 4),
        ..Faults::default()
    });
    match disk.stage(&meta, hs(5)).unwrap() {
        // The meta part is to be sent again.
        Staged::Partial { have } => assert_eq!(have, id.records_len),
        Staged::Installed { .. } => panic!("installed on a full disk"),
    }
    assert_eq!(disk.take_errors(), vec!["snapshot_install"]);
    let current = fs.read_to_string(&Path::new(DIR).join("store.current"));
    assert_eq!(current.unwrap(), "store.1\n");

    // The old store goes on, and once there is space the meta part sent again installs it.
    sim.set_faults(Faults::default());
    write(&mut disk, 6, 8, 10);
    match disk.stage(&meta, hs(8)).unwrap() {
        Staged::Installed { state, .. } => assert_eq!(state.index, 30),
        Staged::Partial { have } => panic!("not installed: {have} bytes staged"),
    }
    sim.power_cut();
    drop(disk);
    let (_, restored) = open(&fs, 1_000_000, 0);
    assert_eq!(restored.snapshot.map(|(s, _)| s.index), Some(30));
}

#[test]
fn an_install_with_no_room_for_a_new_segment_resets_the_wal_in_place() {
    let (sim, fs) = sim();
    let (mut disk, _) = open(&fs, 1_000_000, 0);
    write(&mut disk, 1, 5, 10);
    // A rotation of the node thread's own: the segment prepared at open is not the next one.
    disk.wal.rotate(&hs(5), (5, 1)).unwrap();
    let w = whole_snapshot_at_30();
    // Room for the staged snapshot and store.current, none for a new segment.
    sim.set_faults(Faults {
        capacity: Some(sim.used() + 2 * w.snapshot.total_len() + 4096),
        ..Faults::default()
    });
    match disk.stage(&w, hs(5)).unwrap() {
        Staged::Installed { state, .. } => assert_eq!(state.index, 30),
        Staged::Partial { have } => panic!("not installed: {have} bytes staged"),
    }
    assert_eq!(disk.take_errors(), vec!["wal_rotate"]);
    assert_eq!(disk.wal.base(), (30, 1));
    // It goes on from there, and a power cut keeps it.
    sim.set_faults(Faults::default());
    write(&mut disk, 31, 32, 10);
    sim.power_cut();
    drop(disk);
    let (_, restored) = open(&fs, 1_000_000, 0);
    assert_eq!(restored.snapshot.map(|(s, _)| s.index), Some(30));
    assert_eq!(restored.base, (30, 1));
    let indices: Vec<Index> = restored.entries.iter().map(|e| e.index).collect();
    assert_eq!(indices, vec![31, 32]);
}

/// A disk with entries 1..=5 whose WAL segments have no zeros ahead (each write grows the
/// file), staging the leader's whole snapshot at 30 when `writes` more writes that grow a file
/// fill the disk for good (the space the replaced store frees goes to another writer).
fn install_on_a_filling_disk(writes: u32) -> (SimFs, Fs, Disk, Result<Staged, StorageError>) {
    let (sim, fs) = sim();
    sim.set_segment_prealloc(0);
    let (mut disk, _) = open(&fs, 1_000_000, 0);
    write(&mut disk, 1, 5, 10);
    let w = whole_snapshot_at_30();
    sim.set_faults(Faults {
        growing_writes_left: Some(writes),
        ..Faults::default()
    });
    let staged = disk.stage(&w, hs(5));
    (sim, fs, disk, staged)
}

#[test]
fn an_install_with_no_room_even_to_reset_the_wal_waits_for_space_and_is_never_acknowledged() {
    // The fewest writes with which the store takes the snapshot: the WAL then can grow no file.
    let (sim, fs, mut disk) = (0..100)
        .find_map(|writes| match install_on_a_filling_disk(writes) {
            (sim, fs, disk, Err(e)) if disk.install_pending() => {
                assert!(e.is_disk_full(), "{e}");
                Some((sim, fs, disk))
            }
            (_, _, _, Ok(Staged::Installed { .. })) => panic!("installed after {writes} writes"),
            _ => None,
        })
        .expect("some number of writes lets the store install the snapshot, not the WAL");
    assert!(disk.full().is_some(), "shown as a full disk");
    assert!(disk.take_errors().contains(&"wal_write"));
    let current = fs.read_to_string(&Path::new(DIR).join("store.current"));
    assert_ne!(
        current.unwrap(),
        "store.1\n",
        "the store holds the snapshot"
    );
    // Still full: still pending, nothing for the core.
    assert!(disk.retry_install().unwrap_err().is_disk_full());
    assert!(disk.install_pending());

    // A power cut now reopens to the snapshot (the WAL is started from it at open).
    let image = sim.fork();
    image.set_faults(Faults::default());
    image.power_cut();
    let (_, restored) = open(&Fs::Sim(image), 1_000_000, 0);
    assert_eq!(restored.snapshot.map(|(s, _)| s.index), Some(30));
    assert_eq!(restored.base, (30, 1));

    // Space again: the retry resets the WAL, and only then hands the install to the core.
    sim.set_faults(Faults::default());
    let (from, state, _) = disk.retry_install().unwrap().expect("installed");
    assert_eq!((from, state.index), (2, 30));
    assert!(!disk.install_pending() && disk.full().is_none());
    assert_eq!(disk.retry_install().unwrap().map(|(_, s, _)| s.index), None);
    write(&mut disk, 31, 32, 10);
    sim.power_cut();
    drop(disk);
    let (_, restored) = open(&fs, 1_000_000, 0);
    assert_eq!(restored.base, (30, 1));
    let indices: Vec<Index> = restored.entries.iter().map(|e| e.index).collect();
    assert_eq!(indices, vec![31, 32]);
}

#[test]
fn a_full_disk_refuses_a_batch_which_goes_through_once_there_is_space() {
    let (sim, fs) = sim();
    let (mut disk, _) = open(&fs, 1_000_000, 0);
    write(&mut disk, 1, 10, 100);
    // A batch that outgrows the preallocated segment, on a disk with no room to grow.
    let big: Vec<Entry> = (11..=40).map(|i| entry(i, 100_000)).collect();
    let used = 0;
    sim.set_faults(Faults {
        capacity: Some(used),
        ..Faults::default()
    });
    let e = disk.persist_wal(Some(&hs(10)), &big).unwrap_err();
    assert!(e.is_disk_full(), "{e}");
    assert!(e.to_string().contains("/data/wal"), "{e}");
    assert!(disk.full().is_some());
    assert_eq!(disk.take_errors(), ["wal_write"]);
    // Still full: refused again, never poisoned.
    assert!(disk
        .persist_wal(Some(&hs(10)), &big)
        .unwrap_err()
        .is_disk_full());
    sim.set_faults(Faults::default());
    disk.persist_wal(Some(&hs(10)), &big).unwrap();
    assert!(disk.full().is_none());
    drop(disk);
    sim.power_cut();
    let (_, restored) = open(&fs, 1_000_000, 0);
    assert_eq!(restored.entries.len(), 40);
    assert_eq!(restored.entries[39], big[29]);
}

#[test]
fn a_store_the_disk_filled_is_written_again_without_a_restart() {
    let (sim, fs) = sim();
    let (mut disk, _) = open(&fs, 1_000_000, 0);
    write(&mut disk, 1, 10, 100);
    sim.set_faults(Faults {
        capacity: Some(0),
        ..Faults::default()
    });
    // More than the store's write buffer, so that it writes to the file.
    let entries: Vec<Entry> = (11..=40).map(|i| entry(i, 60_000)).collect();
    let records: Vec<_> = entries.iter().map(|e| record_of(e, false)).collect();
    disk.apply(&records).unwrap();
    assert!(disk.full().is_some());
    assert!(disk.take_errors().contains(&"store_write"));
    assert!(
        !disk.snapshot_due(40),
        "no snapshot of a store that is behind"
    );
    // Reads below the core's memory are refused meanwhile.
    let read = StoreRead {
        id: 1,
        reply_to: "127.0.0.1:9".parse().unwrap(),
        start: 1,
        read_index: 40,
    };
    assert!(matches!(disk.page(&read), ClientResult::Refused { .. }));
    let more: Vec<_> = (41..=45).map(|i| record_of(&entry(i, 10), false)).collect();
    disk.apply(&more).unwrap();
    sim.set_faults(Faults::default());
    wait_until_the_store_is_written_again(&mut disk);
    assert_eq!(disk.store.last_index(), 45);
    let (page, _) = disk.store.read_page(1, 45, 1 << 30).unwrap();
    assert_eq!(page.len(), 45);
    assert_eq!(page[39], records[29]);
    assert_eq!(page[44], more[4]);
}

/// Applies nothing new until a store a full disk left behind is written again (its retry is
/// due a second after the failure).
fn wait_until_the_store_is_written_again(disk: &mut Disk) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while disk.full().is_some() {
        assert!(Instant::now() < deadline, "the store was not written again");
        disk.apply(&[]).unwrap();
        thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_full_disk_at_a_store_read_leaves_the_store_behind_until_there_is_space() {
    let (sim, fs) = sim();
    let (mut disk, _) = open(&fs, 1_000_000, 0);
    write(&mut disk, 1, 3, 10);
    // The read flushes the buffered records first, and finds no room.
    sim.set_faults(Faults {
        capacity: Some(sim.used()),
        ..Faults::default()
    });
    let read = StoreRead {
        id: 1,
        reply_to: "127.0.0.1:9".parse().unwrap(),
        start: 1,
        read_index: 3,
    };
    match disk.page(&read) {
        ClientResult::Refused { reason } => assert!(reason.contains("disk space"), "{reason}"),
        other => panic!("served on a full disk: {other:?}"),
    }
    assert!(disk.full().is_some(), "shown as a full disk");
    assert!(!disk.wal_full(), "the WAL is not held up by it");
    assert_eq!(disk.take_errors(), vec!["store_write"]);
    // Not a failure that stops the peer: applying goes on, and the store catches up.
    sim.set_faults(Faults::default());
    disk.persist_wal(Some(&hs(4)), &[entry(4, 10)]).unwrap();
    disk.apply(&[record_of(&entry(4, 10), false)]).unwrap();
    wait_until_the_store_is_written_again(&mut disk);
    assert_eq!(disk.store.last_index(), 4);
    match disk.page(&StoreRead {
        read_index: 4,
        ..read
    }) {
        ClientResult::Entries { entries, .. } => assert_eq!(entries.len(), 4),
        other => panic!("not served once there is space: {other:?}"),
    }
}

#[test]
fn an_io_error_after_a_full_wal_ends_the_wait_for_space() {
    let (sim, fs) = sim();
    // No zeros ahead in the segment: every frame grows the file.
    sim.set_segment_prealloc(0);
    let (mut disk, _) = open(&fs, 1_000_000, 0);
    write(&mut disk, 1, 3, 10);
    // A full WAL first, then an I/O error: the error is what the loop must see.
    sim.set_faults(Faults {
        capacity: Some(sim.used()),
        ..Faults::default()
    });
    let big = entry(4, 4096);
    assert!(disk
        .persist_wal(Some(&hs(4)), std::slice::from_ref(&big))
        .unwrap_err()
        .is_disk_full());
    assert!(disk.wal_full());
    sim.set_faults(Faults {
        failing_syncs: 1,
        ..Faults::default()
    });
    let e = disk.persist_wal(Some(&hs(4)), &[big]).unwrap_err();
    assert!(!e.is_disk_full(), "{e}");
    assert!(
        !disk.wal_full(),
        "an I/O error ends the wait for space: the peer exits"
    );
}

/// Persists entries 1..=10, injects `faults`, and checks that the next persist fails (not for
/// a full disk: the peer exits) and that every later one is refused, though the fault is gone:
/// what the failed call left on disk is unknown.
fn persist_fails_for_good(faults: Faults) -> (SimFs, Fs) {
    let (sim, fs) = sim();
    let (mut disk, _) = open(&fs, 1_000_000, 0);
    write(&mut disk, 1, 10, 100);
    sim.set_faults(faults);
    let e = disk
        .persist_wal(Some(&hs(11)), &[entry(11, 10)])
        .unwrap_err();
    assert!(!e.is_disk_full(), "{e}");
    assert!(disk.full().is_none(), "not a full disk: the peer exits");
    let again = disk
        .persist_wal(Some(&hs(11)), &[entry(11, 10)])
        .unwrap_err();
    assert!(again.to_string().contains("earlier"), "{again}");
    (sim, fs)
}

#[test]
fn a_failed_fsync_stops_the_wal_for_good() {
    let (_, fs) = persist_fails_for_good(Faults {
        failing_syncs: 1,
        ..Faults::default()
    });
    // A restart reads what is on disk: the batch whose fsync failed may or may not be there.
    let (_, restored) = open(&fs, 1_000_000, 0);
    assert!(restored.entries.len() >= 10);
}

#[test]
fn a_failed_write_stops_the_wal_for_good() {
    let (sim, fs) = persist_fails_for_good(Faults {
        failing_writes: 1,
        ..Faults::default()
    });
    sim.power_cut();
    let (_, restored) = open(&fs, 1_000_000, 0);
    let indices: Vec<Index> = restored.entries.iter().map(|e| e.index).collect();
    assert_eq!(indices, (1..=10).collect::<Vec<_>>());
}

#[test]
fn a_failed_directory_sync_at_a_rotation_stops_the_wal_for_good() {
    let (sim, fs) = sim();
    let (mut disk, _) = open(&fs, 1_000_000, 0);
    write(&mut disk, 1, 10, 100);
    sim.set_faults(Faults {
        failing_dir_syncs: 1,
        ..Faults::default()
    });
    // The new segment's name may or may not be durable: nothing more is written after it.
    let e = disk.wal.rotate(&hs(10), (10, 1)).unwrap_err();
    assert!(!e.is_disk_full(), "{e}");
    let again = disk
        .persist_wal(Some(&hs(11)), &[entry(11, 10)])
        .unwrap_err();
    assert!(again.to_string().contains("earlier"), "{again}");
    drop(disk);
    sim.power_cut();
    // Either way the log is the same: the new segment only restates its end.
    let (_, restored) = open(&fs, 1_000_000, 0);
    assert_eq!(restored.entries.last().map(|e| e.index), Some(10));
    assert_eq!(restored.hard_state.commit, 10);
}

#[test]
fn a_failed_store_write_stops_the_store_and_is_not_taken_for_a_full_disk() {
    let (sim, fs) = sim();
    let (mut disk, _) = open(&fs, 1_000_000, 0);
    write(&mut disk, 1, 10, 100);
    disk.persist_wal(Some(&hs(11)), &[entry(11, 100)]).unwrap();
    sim.set_faults(Faults {
        failing_writes: 1,
        ..Faults::default()
    });
    // Appends are buffered: the failed write shows when the snapshot flushes them.
    disk.apply(&[record_of(&entry(11, 100), false)]).unwrap();
    let e = disk.start_snapshot(&state(11)).unwrap_err();
    assert!(!e.is_disk_full(), "{e}");
    assert!(disk.full().is_none(), "not a full disk: the peer exits");
    assert_eq!(disk.take_errors(), vec!["snapshot"]);
    let again = disk
        .apply(&[record_of(&entry(12, 100), false)])
        .unwrap_err();
    assert!(again.to_string().contains("earlier"), "{again}");
    drop(disk);
    sim.power_cut();
    // The restart re-applies from the WAL, which has the entry.
    let (disk, restored) = open(&fs, 1_000_000, 0);
    assert_eq!(restored.entries.last().map(|e| e.index), Some(11));
    assert!(disk.store.last_index() <= 11);
}

#[test]
fn a_failed_rename_at_an_install_keeps_the_old_store_and_a_resend_installs() {
    let (sim, fs) = sim();
    let (mut disk, _) = open(&fs, 1_000_000, 0);
    write(&mut disk, 1, 5, 10);
    let w = whole_snapshot_at_30();
    sim.set_faults(Faults {
        failing_renames: 1,
        ..Faults::default()
    });
    match disk.stage(&w, hs(5)).unwrap() {
        // Dropped, nothing acknowledged: the leader sends it again.
        Staged::Partial { .. } => {}
        Staged::Installed { .. } => panic!("installed although its rename failed"),
    }
    let current = fs.read_to_string(&Path::new(DIR).join("store.current"));
    assert_eq!(current.unwrap(), "store.1\n");
    // The old store and the WAL go on.
    write(&mut disk, 6, 8, 10);
    assert_eq!(disk.store.last_index(), 8);
    let w = ChunkWrite { offset: 0, ..w };
    match disk.stage(&w, hs(8)).unwrap() {
        Staged::Installed { state, .. } => assert_eq!(state.index, 30),
        Staged::Partial { have } => panic!("not installed on the resend: {have} bytes staged"),
    }
    drop(disk);
    sim.power_cut();
    let (_, restored) = open(&fs, 1_000_000, 0);
    assert_eq!(restored.snapshot.map(|(s, _)| s.index), Some(30));
}

#[test]
fn manual_jobs_run_only_when_asked_and_a_power_cut_loses_a_snapshot_not_run() {
    let (sim, fs) = sim();
    let dir = Path::new(DIR);
    let (mut disk, _) = Disk::open_with(&fs, dir, 1, 10, 0, Jobs::Manual).unwrap();
    disk.settle().unwrap();
    write(&mut disk, 1, 20, 100);
    disk.start_snapshot(&state(20)).unwrap();
    // Queued, not run: nothing to announce, and a power cut now loses the snapshot.
    assert_eq!(disk.snapshot_written().unwrap(), None);
    let before_cut = sim.fork();
    assert_eq!(disk.run_jobs(usize::MAX), 1);
    let id = disk
        .snapshot_written()
        .unwrap()
        .expect("the snapshot is written");
    assert_eq!(id.index, 20);
    assert_eq!(disk.run_jobs(usize::MAX), 0);
    drop(disk);
    before_cut.power_cut();
    let (_, lost) = open(&Fs::Sim(before_cut), 10, 0);
    assert!(lost.snapshot.is_none());
    sim.power_cut();
    let (_, kept) = open(&fs, 10, 0);
    assert_eq!(kept.snapshot.map(|(_, id)| id.index), Some(20));
}
