//! The cache of loaded experts, with a byte budget. The bytes held by cached experts never
//! exceed the budget: a miss first evicts experts that no computation is using, chosen by the
//! [`EvictionPolicy`] (by default the least used, by decayed use counts that remember an
//! expert's uses across its evictions; or from the layer whose next turn is furthest away; or
//! plain least-recently-used), and if the rest are all in use it waits until one is released. Experts marked to stay (the hottest of a routing profile) are never
//! evicted once loaded. Counters per layer and in total make hit rates and I/O watchable.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Condvar, Mutex};

use serde::Serialize;

use crate::error::Result;
use crate::moe::expert::ExpertFfn;

/// Cache counters (per layer or in total).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct CacheCounters {
    pub hits: u64,
    pub misses: u64,
    /// Bytes loaded on a miss (prefetched bytes are counted apart).
    pub bytes_loaded: u64,
    pub evictions: u64,
    /// Experts loaded ahead of use by `--prefetch`, their bytes, how many of them were then used
    /// (each such first use is also a hit), and how many were evicted unused.
    pub prefetched: u64,
    pub prefetched_bytes: u64,
    pub prefetch_used: u64,
    pub prefetch_wasted: u64,
}

impl CacheCounters {
    fn add(&mut self, o: &CacheCounters) {
        self.hits += o.hits;
        self.misses += o.misses;
        self.bytes_loaded += o.bytes_loaded;
        self.evictions += o.evictions;
        self.prefetched += o.prefetched;
        self.prefetched_bytes += o.prefetched_bytes;
        self.prefetch_used += o.prefetch_used;
        self.prefetch_wasted += o.prefetch_wasted;
    }
}

/// A snapshot of the cache's statistics.
#[derive(Debug, Clone, Serialize)]
pub struct CacheStats {
    pub hits: u64,
    pub misses: u64,
    pub bytes_loaded: u64,
    pub evictions: u64,
    pub prefetched: u64,
    pub prefetched_bytes: u64,
    pub prefetch_used: u64,
    pub prefetch_wasted: u64,
    pub resident_bytes: u64,
    pub peak_resident_bytes: u64,
    pub budget_bytes: u64,
    pub per_layer: Vec<CacheCounters>,
}

impl CacheStats {
    pub fn hit_rate(&self) -> f64 {
        let total = self.hits + self.misses;
        if total == 0 {
            0.0
        } else {
            self.hits as f64 / total as f64
        }
    }
}

type Key = (u32, u32);

enum Slot {
    /// Being read by some thread; its bytes are already reserved.
    Loading,
    Ready {
        expert: Arc<dyn ExpertFfn>,
        bytes: u64,
        last_used: u64,
        /// Loaded by a prefetch and not used since.
        prefetched: bool,
    },
}

/// What [`ExpertCache::prefetch`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prefetch {
    /// Loaded, or being loaded by someone else.
    Loaded,
    AlreadyThere,
    /// Not loaded: room could only be made by waiting or by evicting a protected layer's expert.
    NoRoom,
}

struct State {
    slots: HashMap<Key, Slot>,
    clock: u64,
    resident: u64,
    peak: u64,
    layers: Vec<CacheCounters>,
    /// Experts never evicted once loaded ([`ExpertCache::keep_resident`]).
    kept: HashSet<Key>,
    /// Decayed use counts of every expert used so far, resident or not (frequency policies).
    uses: HashMap<Key, DecayedCount>,
}

/// A use count that halves every `half_life` requests: `count * 2^-((now - at) / half_life)`.
#[derive(Debug, Clone, Copy)]
struct DecayedCount {
    count: f64,
    at: u64,
}

impl DecayedCount {
    /// log2 of the count at `now` (monotone in the count, and free of underflow).
    fn log2_at(&self, now: u64, half_life: f64) -> f64 {
        self.count.log2() - (now - self.at) as f64 / half_life
    }

    fn used(&mut self, now: u64, half_life: f64) {
        self.count = self.count * (-((now - self.at) as f64) / half_life).exp2() + 1.0;
        self.at = now;
    }
}

/// Which unused expert a miss evicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EvictionPolicy {
    /// Least recently used first.
    Lru,
    /// Layers run in a cycle, once per token: evict from the layer whose next turn is furthest
    /// away (the layer that ran last), least recently used first within it. Plain LRU evicts
    /// exactly the experts the next layers need when the budget is below the working set.
    LayerCycle,
    /// Least used first, by use counts that halve every [`FREQUENCY_HALF_LIFE_TOKENS`] tokens
    /// (in requests: that times the model's top-k summed over its layers) and that an expert
    /// keeps while evicted (least recently used first among equal counts). The default: on the
    /// trained model's routing it misses least at every budget (`docs/BENCHMARKS.md`).
    #[default]
    Frequency,
    /// [`EvictionPolicy::LayerCycle`]'s choice of layer, then least used first within it, by
    /// the same decayed counts as [`EvictionPolicy::Frequency`].
    LayerCycleFrequency,
}

impl EvictionPolicy {
    pub const ALL: [EvictionPolicy; 4] = [
        EvictionPolicy::Lru,
        EvictionPolicy::LayerCycle,
        EvictionPolicy::Frequency,
        EvictionPolicy::LayerCycleFrequency,
    ];

    fn by_layer_cycle(self) -> bool {
        matches!(
            self,
            EvictionPolicy::LayerCycle | EvictionPolicy::LayerCycleFrequency
        )
    }

    fn by_frequency(self) -> bool {
        matches!(
            self,
            EvictionPolicy::Frequency | EvictionPolicy::LayerCycleFrequency
        )
    }

    /// The name the command line and reports use.
    pub fn name(self) -> &'static str {
        match self {
            EvictionPolicy::Lru => "lru",
            EvictionPolicy::LayerCycle => "layer-cycle",
            EvictionPolicy::Frequency => "frequency",
            EvictionPolicy::LayerCycleFrequency => "layer-cycle-frequency",
        }
    }
}

/// Half-life of the frequency policies' use counts, in decoded tokens (a token makes one
/// request per selected expert per layer).
pub const FREQUENCY_HALF_LIFE_TOKENS: u64 = 8;

/// The cache. Shared by every layer and session of a process.
pub struct ExpertCache {
    budget: u64,
    policy: EvictionPolicy,
    /// In requests.
    half_life: f64,
    state: Mutex<State>,
    changed: Condvar,
}

impl std::fmt::Debug for ExpertCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ExpertCache(budget {} bytes)", self.budget)
    }
}

/// An expert handed out by the cache; while it lives the expert cannot be evicted.
struct Pinned {
    expert: Option<Arc<dyn ExpertFfn>>,
    cache: Arc<ExpertCache>,
}

impl ExpertFfn for Pinned {
    fn forward(&self, x: &[f32], rows: usize, out: &mut [f32]) {
        self.expert
            .as_ref()
            .expect("pinned expert present until drop")
            .forward(x, rows, out)
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        drop(self.expert.take());
        let _guard = self.cache.state.lock().unwrap_or_else(|e| e.into_inner());
        self.cache.changed.notify_all();
    }
}

impl ExpertCache {
    #[cfg(test)]
    pub fn new(budget: u64, layers: usize) -> Arc<Self> {
        Self::with_policy(budget, layers, EvictionPolicy::default())
    }

    /// A cache whose frequency policies take a top-k of 2 per layer for their half-life.
    #[cfg(test)]
    pub fn with_policy(budget: u64, layers: usize, policy: EvictionPolicy) -> Arc<Self> {
        let half_life = FREQUENCY_HALF_LIFE_TOKENS * layers.max(1) as u64 * 2;
        Self::with_half_life(budget, layers, policy, half_life)
    }

    /// [`ExpertCache::with_policy`] with the frequency policies' half-life given in requests.
    pub fn with_half_life(
        budget: u64,
        layers: usize,
        policy: EvictionPolicy,
        half_life_requests: u64,
    ) -> Arc<Self> {
        Arc::new(ExpertCache {
            budget,
            policy,
            half_life: half_life_requests.max(1) as f64,
            state: Mutex::new(State {
                slots: HashMap::new(),
                clock: 0,
                resident: 0,
                peak: 0,
                layers: vec![CacheCounters::default(); layers],
                kept: HashSet::new(),
                uses: HashMap::new(),
            }),
            changed: Condvar::new(),
        })
    }

    /// Whether `(layer, expert)` is loaded now (an expert being loaded is not), without
    /// counting as a use.
    pub fn is_resident(&self, layer: u32, expert: u32) -> bool {
        let st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        matches!(st.slots.get(&(layer, expert)), Some(Slot::Ready { .. }))
    }

    /// The expert `(layer, expert)`, loaded by `load` on a miss. `bytes` is what the loaded
    /// expert will hold in memory; it must not exceed the budget.
    pub fn get(
        self: &Arc<Self>,
        layer: u32,
        expert: u32,
        bytes: u64,
        load: impl FnOnce() -> Result<Arc<dyn ExpertFfn>>,
    ) -> Result<Arc<dyn ExpertFfn>> {
        assert!(
            bytes <= self.budget,
            "expert of {bytes} bytes does not fit the {}-byte budget",
            self.budget
        );
        let key = (layer, expert);
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let next_tick = st.clock + 1;
        self.count_use(&mut st, key, next_tick);
        loop {
            st.clock += 1;
            let now = st.clock;
            match st.slots.get_mut(&key) {
                Some(Slot::Ready {
                    expert,
                    last_used,
                    prefetched,
                    ..
                }) => {
                    *last_used = now;
                    let e = expert.clone();
                    let was_prefetched = std::mem::take(prefetched);
                    let counters = &mut st.layers[layer as usize];
                    counters.hits += 1;
                    counters.prefetch_used += was_prefetched as u64;
                    return Ok(self.pin(e));
                }
                Some(Slot::Loading) => {
                    st = self.changed.wait(st).unwrap_or_else(|e| e.into_inner());
                    continue;
                }
                None => {}
            }
            // make room: evict unused experts per the policy
            self.make_room(&mut st, layer, bytes, now, &[]);
            if st.resident + bytes > self.budget {
                // everything left is in use by other computations: wait for one to finish
                st = self.changed.wait(st).unwrap_or_else(|e| e.into_inner());
                continue;
            }
            st.resident += bytes;
            st.peak = st.peak.max(st.resident);
            st.slots.insert(key, Slot::Loading);
            st.layers[layer as usize].misses += 1;
            drop(st);
            let loaded = load();
            let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            let result = match loaded {
                Ok(expert) => {
                    st.layers[layer as usize].bytes_loaded += bytes;
                    let now = st.clock;
                    st.slots.insert(
                        key,
                        Slot::Ready {
                            expert: expert.clone(),
                            bytes,
                            last_used: now,
                            prefetched: false,
                        },
                    );
                    Ok(self.pin(expert))
                }
                Err(e) => {
                    st.slots.remove(&key);
                    st.resident -= bytes;
                    Err(e)
                }
            };
            self.changed.notify_all();
            return result;
        }
    }

    /// Counts a use of `key` at `now` in the frequency policies' decayed counts.
    fn count_use(&self, st: &mut State, key: Key, now: u64) {
        if self.policy.by_frequency() {
            st.uses
                .entry(key)
                .or_insert(DecayedCount {
                    count: 0.0,
                    at: now,
                })
                .used(now, self.half_life);
        }
    }

    /// Evicts unused experts, chosen by the policy for a request of `layer` at time `now`, until
    /// `bytes` more fit or nothing more may go. Experts in use, kept ones and those of the
    /// `protect`ed layers stay.
    fn make_room(&self, st: &mut State, layer: u32, bytes: u64, now: u64, protect: &[u32]) {
        let n_layers = st.layers.len() as u64;
        while st.resident + bytes > self.budget {
            let victim = st
                .slots
                .iter()
                .filter_map(|(k, s)| match s {
                    Slot::Ready {
                        expert, last_used, ..
                    } if Arc::strong_count(expert) == 1
                        && !st.kept.contains(k)
                        && !protect.contains(&k.0) =>
                    {
                        // layers until this expert's layer runs next; the running layer counts
                        // as nearest, since its other selected experts follow right away
                        let until_next_turn = if self.policy.by_layer_cycle() {
                            (k.0 as u64 + n_layers - layer as u64) % n_layers
                        } else {
                            0
                        };
                        let uses = match st.uses.get(k) {
                            Some(c) if self.policy.by_frequency() => c.log2_at(now, self.half_life),
                            _ => 0.0,
                        };
                        Some((until_next_turn, uses, *last_used, *k))
                    }
                    _ => None,
                })
                // furthest turn, then fewest uses, then least recent
                .min_by(|a, b| {
                    b.0.cmp(&a.0)
                        .then(a.1.total_cmp(&b.1))
                        .then(a.2.cmp(&b.2))
                        .then(a.3.cmp(&b.3))
                });
            let Some((_, _, _, vk)) = victim else { break };
            if let Some(Slot::Ready {
                bytes: b,
                prefetched,
                ..
            }) = st.slots.remove(&vk)
            {
                st.resident -= b;
                let counters = &mut st.layers[vk.0 as usize];
                counters.evictions += 1;
                counters.prefetch_wasted += prefetched as u64;
            }
        }
    }

    /// Loads `(layer, expert)` ahead of its use, if it is not in memory and room can be made at
    /// once without evicting an expert of the `protect`ed layers (the running layer and the one
    /// the prefetch is for); never waits for memory. Counts no use of the expert.
    pub fn prefetch(
        self: &Arc<Self>,
        layer: u32,
        expert: u32,
        bytes: u64,
        protect: &[u32],
        load: impl FnOnce() -> Result<Arc<dyn ExpertFfn>>,
    ) -> Prefetch {
        if bytes > self.budget {
            return Prefetch::NoRoom;
        }
        let key = (layer, expert);
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if st.slots.contains_key(&key) {
            return Prefetch::AlreadyThere;
        }
        let now = st.clock;
        self.make_room(&mut st, layer, bytes, now, protect);
        if st.resident + bytes > self.budget {
            return Prefetch::NoRoom;
        }
        st.resident += bytes;
        st.peak = st.peak.max(st.resident);
        st.slots.insert(key, Slot::Loading);
        drop(st);
        let loaded = load();
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        match loaded {
            Ok(expert) => {
                let now = st.clock;
                // ranked as if just used, so that the misses before its use do not evict it
                // first (a wrong prediction then ages like any expert used once)
                self.count_use(&mut st, key, now);
                st.slots.insert(
                    key,
                    Slot::Ready {
                        expert,
                        bytes,
                        last_used: now,
                        prefetched: true,
                    },
                );
                let counters = &mut st.layers[layer as usize];
                counters.prefetched += 1;
                counters.prefetched_bytes += bytes;
            }
            Err(e) => {
                // the demand load that follows reports the error
                log::debug!("prefetch of layer {layer} expert {expert} failed: {e}");
                st.slots.remove(&key);
                st.resident -= bytes;
            }
        }
        self.changed.notify_all();
        Prefetch::Loaded
    }

    /// The budget in bytes.
    pub fn budget(&self) -> u64 {
        self.budget
    }

    /// Marks `(layer, expert)` keys to stay in memory once loaded: misses never evict them.
    /// `kept_bytes` is what they hold together and `largest_other` the largest expert outside
    /// them; the rest of the budget must still fit that one, or every other expert would wait
    /// forever (refused). Replaces an earlier set.
    pub fn keep_resident(
        &self,
        keys: &[(u32, u32)],
        kept_bytes: u64,
        largest_other: u64,
    ) -> Result<()> {
        if kept_bytes.saturating_add(largest_other) > self.budget {
            return Err(crate::Error::InvalidInput(format!(
                "keeping {kept_bytes} bytes of experts resident leaves less than one more expert ({largest_other} bytes) of the {}-byte cache budget",
                self.budget
            )));
        }
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.kept = keys.iter().copied().collect();
        Ok(())
    }

    /// The keys [`ExpertCache::keep_resident`] set, sorted.
    #[cfg(test)]
    pub fn kept_keys(&self) -> Vec<(u32, u32)> {
        let st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let mut keys: Vec<_> = st.kept.iter().copied().collect();
        keys.sort_unstable();
        keys
    }

    fn pin(self: &Arc<Self>, expert: Arc<dyn ExpertFfn>) -> Arc<dyn ExpertFfn> {
        Arc::new(Pinned {
            expert: Some(expert),
            cache: self.clone(),
        })
    }

    pub fn stats(&self) -> CacheStats {
        let st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let mut total = CacheCounters::default();
        for l in &st.layers {
            total.add(l);
        }
        CacheStats {
            hits: total.hits,
            misses: total.misses,
            bytes_loaded: total.bytes_loaded,
            evictions: total.evictions,
            prefetched: total.prefetched,
            prefetched_bytes: total.prefetched_bytes,
            prefetch_used: total.prefetch_used,
            prefetch_wasted: total.prefetch_wasted,
            resident_bytes: st.resident,
            peak_resident_bytes: st.peak,
            budget_bytes: self.budget,
            per_layer: st.layers.clone(),
        }
    }
}

/// The experts a routing profile used most, over all blocks, whose in-memory bytes add up to at
/// most `allowance`: the experts `--pin-hot` keeps resident. Most chosen first (ties: lower
/// block, then lower expert); an expert that does not fit is skipped and smaller ones after it
/// may still fit. Experts never chosen are never kept.
pub fn hot_experts(
    usage: &crate::moe::Usage,
    expert_bytes: &[Vec<u64>],
    allowance: u64,
) -> Vec<(u32, u32)> {
    // (tokens that chose it, block, expert, bytes)
    let mut ranked = vec![];
    for (b, (bytes, used)) in expert_bytes.iter().zip(&usage.layers).enumerate() {
        for (e, (&chosen, &size)) in used.chosen.iter().zip(bytes).enumerate() {
            if chosen > 0 {
                ranked.push((chosen, b, e, size));
            }
        }
    }
    ranked.sort_by(|x, y| y.0.cmp(&x.0).then((x.1, x.2).cmp(&(y.1, y.2))));
    let (mut keys, mut kept) = (vec![], 0u64);
    for &(_, b, e, size) in &ranked {
        if kept + size <= allowance {
            kept += size;
            keys.push((b as u32, e as u32));
        }
    }
    keys
}

/// The bytes the experts `keys` hold together, and the largest expert outside them: what
/// [`ExpertCache::keep_resident`] checks against the budget.
pub fn kept_and_largest_other(keys: &[(u32, u32)], expert_bytes: &[Vec<u64>]) -> (u64, u64) {
    let (mut kept, mut largest_other) = (0, 0);
    for (b, sizes) in expert_bytes.iter().enumerate() {
        for (e, &size) in sizes.iter().enumerate() {
            if keys.contains(&(b as u32, e as u32)) {
                kept += size;
            } else {
                largest_other = largest_other.max(size);
            }
        }
    }
    (kept, largest_other)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    struct Fake;
    impl ExpertFfn for Fake {
        fn forward(&self, _: &[f32], _: usize, _: &mut [f32]) {}
    }

    fn loader(n: &AtomicUsize) -> Result<Arc<dyn ExpertFfn>> {
        n.fetch_add(1, Ordering::Relaxed);
        Ok(Arc::new(Fake))
    }

    #[test]
    fn lru_eviction_within_budget() {
        let cache = ExpertCache::with_policy(30, 1, EvictionPolicy::Lru);
        let loads = AtomicUsize::new(0);
        for e in [0, 1, 2, 0, 3, 1] {
            drop(cache.get(0, e, 10, || loader(&loads)).unwrap());
        }
        // 0,1,2 miss; 0 hits; 3 evicts 1 (LRU); 1 misses again and evicts 2
        let s = cache.stats();
        assert_eq!((s.hits, s.misses, s.evictions), (1, 5, 2));
        assert_eq!(loads.load(Ordering::Relaxed), 5);
        assert!(s.peak_resident_bytes <= 30 && s.resident_bytes == 30);
        assert_eq!(s.bytes_loaded, 50);
    }

    /// A cyclic scan over 4 layers with room for 6 of 8 experts: LRU always evicts the expert
    /// needed next and never hits; the layer-cycle policy hits half of the time (the optimum,
    /// evicting what is needed furthest ahead, is 5 of 8).
    #[test]
    fn layer_cycle_policy_beats_lru_on_cyclic_scans() {
        let hits = |policy| {
            let cache = ExpertCache::with_policy(60, 4, policy);
            let loads = AtomicUsize::new(0);
            for _token in 0..20 {
                for layer in 0..4 {
                    for e in 0..2 {
                        drop(cache.get(layer, e, 10, || loader(&loads)).unwrap());
                    }
                }
            }
            let s = cache.stats();
            assert!(s.peak_resident_bytes <= 60);
            s.hits
        };
        assert_eq!(hits(EvictionPolicy::Lru), 0);
        let h = hits(EvictionPolicy::LayerCycle);
        assert!(h >= 19 * 4, "layer-cycle hits {h}");
    }

    #[test]
    fn pinned_experts_are_not_evicted_and_waiters_resume() {
        let cache = ExpertCache::new(10, 1);
        let loads = AtomicUsize::new(0);
        let held = cache.get(0, 0, 10, || loader(&loads)).unwrap();
        let c2 = cache.clone();
        let t = std::thread::spawn(move || {
            let n = AtomicUsize::new(0);
            drop(c2.get(0, 1, 10, || loader(&n)).unwrap());
        });
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert_eq!(
            cache.stats().misses,
            1,
            "second request waits while the only slot is pinned"
        );
        drop(held);
        t.join().unwrap();
        let s = cache.stats();
        assert_eq!((s.misses, s.evictions), (2, 1));
        assert!(s.peak_resident_bytes <= 10);
    }

    /// Room for 3 experts, expert 0 kept: a scan over 0..4 (4 experts) evicts among 1..3 only.
    #[test]
    fn kept_experts_are_never_evicted() {
        let cache = ExpertCache::with_policy(30, 1, EvictionPolicy::Lru);
        cache.keep_resident(&[(0, 0)], 10, 10).unwrap();
        let loads = AtomicUsize::new(0);
        for _ in 0..5 {
            for e in 0..4 {
                drop(cache.get(0, e, 10, || loader(&loads)).unwrap());
            }
        }
        // expert 0: one miss then 4 hits; 1..3 cycle through 2 free slots (LRU: always missing)
        let s = cache.stats();
        assert_eq!(s.misses, 1 + 15);
        assert_eq!(s.hits, 4);
        assert!(cache.is_resident(0, 0));
        assert!(s.peak_resident_bytes <= 30);
        // no room left for one more expert: refused, the earlier set stays
        assert!(cache.keep_resident(&[(0, 1), (0, 2)], 30, 10).is_err());
        drop(cache.get(0, 1, 10, || loader(&loads)).unwrap());
        assert!(cache.is_resident(0, 0));
    }

    /// Prefetch never waits and never evicts a protected layer's expert; a prefetched expert's
    /// first use is a hit counted as used, one evicted unused is counted as wasted.
    #[test]
    fn prefetch_loads_into_free_room_and_counts_its_use() {
        let cache = ExpertCache::with_policy(30, 3, EvictionPolicy::Lru);
        let loads = AtomicUsize::new(0);
        let pf =
            |layer, e, protect: &[u32]| cache.prefetch(layer, e, 10, protect, || loader(&loads));
        assert_eq!(pf(1, 0, &[0, 1]), Prefetch::Loaded);
        assert_eq!(pf(1, 0, &[0, 1]), Prefetch::AlreadyThere);
        drop(cache.get(1, 0, 10, || loader(&loads)).unwrap());
        let s = cache.stats();
        assert_eq!(
            (s.hits, s.misses, s.prefetched, s.prefetch_used),
            (1, 0, 1, 1)
        );
        // fill the budget with layer 0 and 1 experts: a prefetch protecting both finds no room
        drop(cache.get(0, 0, 10, || loader(&loads)).unwrap());
        drop(cache.get(0, 1, 10, || loader(&loads)).unwrap());
        assert_eq!(pf(2, 0, &[0, 1]), Prefetch::NoRoom);
        assert_eq!(cache.stats().evictions, 0);
        // protecting only layer 1, it evicts a layer-0 expert (the least recent)
        assert_eq!(pf(2, 0, &[1, 2]), Prefetch::Loaded);
        assert!(!cache.is_resident(0, 0) && cache.is_resident(0, 1));
        // a held expert is never evicted: with all others protected or held, no room
        let held = cache.get(0, 1, 10, || loader(&loads)).unwrap();
        assert_eq!(pf(2, 1, &[1, 2]), Prefetch::NoRoom);
        drop(held);
        // the unused prefetched expert of layer 2, evicted by misses, is counted as wasted
        for e in 5..8 {
            drop(cache.get(0, e, 10, || loader(&loads)).unwrap());
        }
        let s = cache.stats();
        assert_eq!(
            (s.prefetched, s.prefetch_used, s.prefetch_wasted),
            (2, 1, 1)
        );
        assert!(s.peak_resident_bytes <= 30);
    }

    #[test]
    fn failed_loads_release_their_reservation() {
        let cache = ExpertCache::new(10, 2);
        let err = cache.get(1, 0, 10, || Err(crate::Error::CorruptPack("boom".into())));
        assert!(err.is_err());
        assert_eq!(cache.stats().resident_bytes, 0);
        let loads = AtomicUsize::new(0);
        assert!(cache.get(1, 0, 10, || loader(&loads)).is_ok());
        assert_eq!(cache.stats().per_layer[1].misses, 2);
    }
}
