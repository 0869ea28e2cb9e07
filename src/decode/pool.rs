//! The engine's decoders, kept for its whole life: one per model, built on first use and reused by every
//! chunk, every method of a sweep and every `decode` call, so that a GPU decoder uploads its weights once per
//! engine rather than once per chunk. A decoder is rebuilt only when a request needs more room than it has
//! (more slots, positions or prefill tokens, or another device), and then with the larger of both shapes, so
//! the pool settles after the largest request.

use crate::backend::Backend;
use crate::error::Result;
use crate::model::gpu::{GpuOptions, new_decoder_with};
use crate::model::{Decoder, Model};
use std::sync::{Arc, Mutex};

/// A decoder that can wait in the pool between calls (and be used from another thread than its builder's).
pub type PooledDecoder = Box<dyn Decoder + Send>;

/// The room a decoder was built with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Room {
    /// Where its forward passes run.
    pub device: Backend,
    /// How a GPU decoder holds its KV cache and linear layers.
    pub gpu: GpuOptions,
    /// KV-cache slots (rows x streams on this model).
    pub slots: usize,
    /// Positions per slot.
    pub positions: usize,
    /// Tokens of one forward call (the prefill's limit).
    pub tokens: usize,
}

impl Room {
    /// Whether a decoder built with `self` serves a request for `need`.
    fn holds(&self, need: &Room) -> bool {
        self.device == need.device
            && self.gpu == need.gpu
            && self.slots >= need.slots
            && self.positions >= need.positions
            && self.tokens >= need.tokens
    }

    /// The smallest room that holds both (the same device as `need`).
    fn union(&self, need: &Room) -> Room {
        if self.device != need.device || self.gpu != need.gpu {
            return *need;
        }
        Room {
            device: need.device,
            gpu: need.gpu,
            slots: self.slots.max(need.slots),
            positions: self.positions.max(need.positions),
            tokens: self.tokens.max(need.tokens),
        }
    }
}

/// One model's pooled decoder and its room.
struct Entry {
    dec: PooledDecoder,
    room: Room,
}

/// Decoders per model index. A call takes the decoders it needs out of the pool and gives them back when it
/// is done, so two threads decoding on one engine at once never share a decoder (the second builds its own).
#[derive(Default)]
pub struct DecoderPool {
    entries: Mutex<Vec<Option<Entry>>>,
    built: Mutex<usize>,
}

impl DecoderPool {
    /// A decoder of `model` (index `m`) with at least `need`'s room and every slot empty: the pooled one when it
    /// fits, else a new one with the union of both rooms.
    pub fn take(&self, m: usize, model: &Arc<Model>, need: Room) -> Result<(PooledDecoder, Room)> {
        let held = {
            let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
            entries.get_mut(m).and_then(Option::take)
        };
        match held {
            Some(mut e) if e.room.holds(&need) => {
                for slot in 0..e.dec.slots() {
                    e.dec.reset(slot);
                }
                Ok((e.dec, e.room))
            }
            held => {
                let room = held.map_or(need, |e| e.room.union(&need));
                // The old decoder (and its device memory) is dropped before the new one is built.
                let dec =
                    new_decoder_with(room.device, model.clone(), room.slots, room.positions, room.tokens, room.gpu)?;
                *self.built.lock().unwrap_or_else(|e| e.into_inner()) += 1;
                Ok((dec, room))
            }
        }
    }

    /// Gives a decoder back for the next call (keeping the larger one when another call gave one back first).
    pub fn give_back(&self, m: usize, dec: PooledDecoder, room: Room) {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if entries.len() <= m {
            entries.resize_with(m + 1, || None);
        }
        let keep = match &entries[m] {
            Some(e) => e.room.device != room.device || e.room.gpu != room.gpu || room.holds(&e.room),
            None => true,
        };
        if keep {
            entries[m] = Some(Entry { dec, room });
        }
    }

    /// Drops every pooled decoder (their models change: an adapter is attached).
    pub fn clear(&mut self) {
        self.entries.get_mut().unwrap_or_else(|e| e.into_inner()).clear();
    }

    /// How many decoders this pool has built so far (each build uploads a GPU decoder's weights).
    pub fn built(&self) -> usize {
        *self.built.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The decoders one call took from a pool, per model index (None: the model runs no stream), given back when
/// the lease is dropped, after success or error alike.
pub struct Lease<'a> {
    pool: &'a DecoderPool,
    /// The decoders, indexed by model.
    pub decoders: Vec<Option<PooledDecoder>>,
    rooms: Vec<Option<Room>>,
}

impl DecoderPool {
    /// Takes a decoder for each model whose `need` is Some.
    pub fn lease<'a>(&'a self, models: &[&Arc<Model>], need: &[Option<Room>]) -> Result<Lease<'a>> {
        let mut lease = Lease { pool: self, decoders: Vec::with_capacity(need.len()), rooms: vec![] };
        for (m, (model, need)) in models.iter().zip(need).enumerate() {
            match need {
                Some(n) => {
                    let (d, room) = self.take(m, model, *n)?;
                    lease.decoders.push(Some(d));
                    lease.rooms.push(Some(room));
                }
                None => {
                    lease.decoders.push(None);
                    lease.rooms.push(None);
                }
            }
        }
        Ok(lease)
    }
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        for (m, (d, r)) in self.decoders.drain(..).zip(self.rooms.drain(..)).enumerate() {
            if let (Some(d), Some(r)) = (d, r) {
                self.pool.give_back(m, d, r);
            }
        }
    }
}
