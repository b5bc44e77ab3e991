//! The session handle: one sequence and its KV cache, used by one thread at a time (a second
//! thread gets `MOE_EDGE_ERR_BUSY`), cancellable from any thread. A session either continues raw
//! text (`moe_edge_generate`) or holds a conversation (`moe_edge_chat`), whichever is used first.

use std::ffi::{c_char, c_void};
use std::sync::{Arc, Mutex, TryLockError};

use moe_edge_engine::{
    CancelHandle, Conversation, Flow, GenerateParams, Generation, Generator, Model, SamplingParams,
    Session, StopReason,
};

use crate::model::{check_struct_size, model_ref, moe_edge_model, tokenizer};
use crate::status::*;

/// Called with each piece of text as it is generated: `piece` (UTF-8, `len` bytes, not
/// NUL-terminated) is valid only during the call. Return 0 to go on, anything else to stop.
pub type moe_edge_piece_callback =
    Option<unsafe extern "C" fn(piece: *const c_char, len: usize, user: *mut c_void) -> i32>;

/// How to generate. Get defaults from `moe_edge_generate_default_params()`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct moe_edge_generate_params {
    pub struct_size: u32,
    /// The most tokens to generate.
    pub max_tokens: u32,
    /// 0: greedy.
    pub temperature: f32,
    /// In (0, 1]; 1: off.
    pub top_p: f32,
    /// 0: off.
    pub top_k: u32,
    /// 1: off.
    pub repetition_penalty: f32,
    pub seed: u64,
}

/// The defaults: greedy (temperature 0, top_p 1, top_k 0, repetition_penalty 1), 128 tokens at
/// most, seed 0; `struct_size` set.
#[no_mangle]
pub extern "C" fn moe_edge_generate_default_params() -> moe_edge_generate_params {
    moe_edge_generate_params {
        struct_size: std::mem::size_of::<moe_edge_generate_params>() as u32,
        max_tokens: 128,
        temperature: 0.0,
        top_p: 1.0,
        top_k: 0,
        repetition_penalty: 1.0,
        seed: 0,
    }
}

/// Why a generation ended.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum moe_edge_stop_reason {
    /// The model's end-of-sequence (or end-of-turn) token.
    MOE_EDGE_STOP_EOS = 0,
    MOE_EDGE_STOP_MAX_TOKENS = 1,
    MOE_EDGE_STOP_CONTEXT_FULL = 2,
    /// The callback returned non-zero, or `moe_edge_cancel` was called.
    MOE_EDGE_STOP_CANCELLED = 3,
    MOE_EDGE_STOP_STOP_STRING = 4,
}

/// Figures of one generation.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct moe_edge_generation_stats {
    pub struct_size: u32,
    /// Tokens fed before generating (the new part of the prompt).
    pub prompt_tokens: u32,
    pub generated_tokens: u32,
    pub prefill_seconds: f64,
    pub decode_seconds: f64,
    pub prefill_tokens_per_second: f64,
    pub decode_tokens_per_second: f64,
    pub stop_reason: moe_edge_stop_reason,
}

/// A `moe_edge_generation_stats` with its `struct_size` set and every figure zero, to pass to
/// `moe_edge_generate` or `moe_edge_chat`.
#[no_mangle]
pub extern "C" fn moe_edge_generation_stats_init() -> moe_edge_generation_stats {
    moe_edge_generation_stats {
        struct_size: std::mem::size_of::<moe_edge_generation_stats>() as u32,
        prompt_tokens: 0,
        generated_tokens: 0,
        prefill_seconds: 0.0,
        decode_seconds: 0.0,
        prefill_tokens_per_second: 0.0,
        decode_tokens_per_second: 0.0,
        stop_reason: moe_edge_stop_reason::MOE_EDGE_STOP_EOS,
    }
}

enum Mode {
    /// Not used yet.
    Fresh,
    Raw(Box<Session>),
    Chat(Box<Conversation<'static>>),
}

// moe_edge_cancel reads a session while another thread generates on it
const _: () = {
    const fn shared_between_threads<T: Send + Sync>() {}
    shared_between_threads::<moe_edge_session>();
};

/// A session (opaque).
pub struct moe_edge_session {
    // dropped before `model`, which it borrows (field order is drop order)
    state: Mutex<Mode>,
    cancel: CancelHandle,
    model: Arc<Model>,
}

/// Creates a session over `model` into `*out` (NULL on failure). Free it with
/// `moe_edge_session_free`. The session keeps the model alive.
///
/// # Safety
/// `model` is a live handle; `out` points to writable storage for a pointer.
#[no_mangle]
pub unsafe extern "C" fn moe_edge_session_new(
    model: *const moe_edge_model,
    out: *mut *mut moe_edge_session,
) -> moe_edge_status {
    guard(|| {
        if out.is_null() {
            return Err(null("out"));
        }
        // SAFETY: not NULL, writable (contract).
        unsafe { *out = std::ptr::null_mut() };
        // SAFETY: caller's contract.
        let model = unsafe { model_ref(model) }?;
        let session = Box::new(moe_edge_session {
            state: Mutex::new(Mode::Fresh),
            cancel: CancelHandle::default(),
            model: model.model.clone(),
        });
        // SAFETY: checked above.
        unsafe { *out = Box::into_raw(session) };
        Ok(())
    })
}

/// Frees a session (NULL is ignored). No other thread may use it during or after the call.
///
/// # Safety
/// `session` is NULL or a pointer from `moe_edge_session_new` not freed yet.
#[no_mangle]
pub unsafe extern "C" fn moe_edge_session_free(session: *mut moe_edge_session) {
    let _ = guard(|| {
        if !session.is_null() {
            // SAFETY: from Box::into_raw in moe_edge_session_new, freed once (contract).
            drop(unsafe { Box::from_raw(session) });
        }
        Ok(())
    });
}

/// Stops the generation running on `session` before its next token; callable from any thread
/// while the session lives. Has no effect when nothing is running.
///
/// # Safety
/// `session` is NULL or a live session.
#[no_mangle]
pub unsafe extern "C" fn moe_edge_cancel(session: *const moe_edge_session) -> moe_edge_status {
    guard(|| {
        // SAFETY: NULL or live (contract); only the cancel flag, an atomic, is touched.
        let s = unsafe { session_ref(session) }?;
        s.cancel.cancel();
        Ok(())
    })
}

/// Forgets the sequence (and conversation) the session holds.
///
/// # Safety
/// `session` is a live session.
#[no_mangle]
pub unsafe extern "C" fn moe_edge_session_reset(session: *mut moe_edge_session) -> moe_edge_status {
    guard(|| {
        // SAFETY: caller's contract.
        let s = unsafe { session_ref(session) }?;
        *lock(s)? = Mode::Fresh;
        Ok(())
    })
}

/// # Safety
/// `p` is NULL or a live session handle.
unsafe fn session_ref<'a>(p: *const moe_edge_session) -> Outcome<&'a moe_edge_session> {
    // SAFETY: NULL or a live handle (caller's contract).
    unsafe { p.as_ref() }.ok_or_else(|| null("session"))
}

fn lock(s: &moe_edge_session) -> Outcome<std::sync::MutexGuard<'_, Mode>> {
    match s.state.try_lock() {
        Ok(g) => Ok(g),
        Err(TryLockError::WouldBlock) => Err(Failure(
            MOE_EDGE_ERR_BUSY,
            "the session is in use by another thread (a session is single-threaded)".into(),
        )),
        // an earlier call panicked mid-way: its state cannot be trusted
        Err(TryLockError::Poisoned(p)) => {
            let mut g = p.into_inner();
            *g = Mode::Fresh;
            s.state.clear_poison();
            Ok(g)
        }
    }
}

/// # Safety
/// `params` is NULL or points to a `moe_edge_generate_params`.
unsafe fn read_params(
    params: *const moe_edge_generate_params,
) -> Outcome<moe_edge_generate_params> {
    if params.is_null() {
        return Ok(moe_edge_generate_default_params());
    }
    // SAFETY: not NULL (contract); the size is read before the rest.
    let size = unsafe { (*params).struct_size };
    check_struct_size(
        size,
        std::mem::size_of::<moe_edge_generate_params>(),
        "moe_edge_generate_params",
    )?;
    // SAFETY: as above.
    Ok(unsafe { *params })
}

fn generate_params(model: &Model, p: &moe_edge_generate_params) -> Outcome<GenerateParams> {
    if p.max_tokens == 0 {
        return Err(invalid("max_tokens must be at least 1"));
    }
    let sampling = SamplingParams {
        temperature: p.temperature,
        top_k: p.top_k as usize,
        top_p: p.top_p,
        repetition_penalty: p.repetition_penalty,
        seed: p.seed,
    };
    sampling.check()?;
    let mut g = GenerateParams::for_model(model, p.max_tokens as usize);
    g.sampling = sampling;
    Ok(g)
}

/// Streams each step's text to the callback; its non-zero return stops the generation.
fn streamer(
    callback: moe_edge_piece_callback,
    user: *mut c_void,
) -> impl FnMut(&moe_edge_engine::Step) -> Flow {
    move |step| {
        let Some(cb) = callback else {
            return Flow::Continue;
        };
        if step.text.is_empty() {
            return Flow::Continue;
        }
        // SAFETY: the callback and `user` come from the caller, who guarantees the callback is
        // valid; the piece is valid for the duration of the call, as documented.
        let stop = unsafe { cb(step.text.as_ptr() as *const c_char, step.text.len(), user) };
        if stop != 0 {
            Flow::Stop
        } else {
            Flow::Continue
        }
    }
}

/// # Safety
/// `stats` is NULL or points to a `moe_edge_generation_stats`.
unsafe fn write_stats(
    stats: *mut moe_edge_generation_stats,
    g: &Generation,
    fed: usize,
) -> Outcome {
    if stats.is_null() {
        return Ok(());
    }
    // SAFETY: not NULL (contract); the size is read before the rest is written.
    let size = unsafe { (*stats).struct_size };
    check_struct_size(
        size,
        std::mem::size_of::<moe_edge_generation_stats>(),
        "moe_edge_generation_stats",
    )?;
    let out = moe_edge_generation_stats {
        struct_size: size,
        prompt_tokens: fed as u32,
        generated_tokens: g.generated_ids.len() as u32,
        prefill_seconds: g.prefill_seconds,
        decode_seconds: g.decode_seconds,
        prefill_tokens_per_second: fed as f64 / g.prefill_seconds.max(1e-9),
        decode_tokens_per_second: g.decode_tokens_per_s(),
        stop_reason: match g.stop_reason {
            StopReason::Eos => moe_edge_stop_reason::MOE_EDGE_STOP_EOS,
            StopReason::MaxTokens => moe_edge_stop_reason::MOE_EDGE_STOP_MAX_TOKENS,
            StopReason::ContextFull => moe_edge_stop_reason::MOE_EDGE_STOP_CONTEXT_FULL,
            StopReason::Cancelled => moe_edge_stop_reason::MOE_EDGE_STOP_CANCELLED,
            StopReason::StopString => moe_edge_stop_reason::MOE_EDGE_STOP_STOP_STRING,
        },
    };
    // SAFETY: checked above.
    unsafe { *stats = out };
    Ok(())
}

/// Continues the session's text with `prompt` (encoded with the tokenizer's special tokens on
/// the first call of a session, as they are) and generates, streaming pieces to `callback` (may
/// be NULL). `params` and `stats` may be NULL. The KV cache is kept: the next call continues
/// after the generated text. If the call fails, the session starts over from an empty sequence.
///
/// # Safety
/// `session` is a live session used by no other thread; `prompt` a NUL-terminated string;
/// `params` NULL or valid; `callback` NULL or a valid function that may be called with `user`;
/// `stats` NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn moe_edge_generate(
    session: *mut moe_edge_session,
    prompt: *const c_char,
    params: *const moe_edge_generate_params,
    callback: moe_edge_piece_callback,
    user: *mut c_void,
    stats: *mut moe_edge_generation_stats,
) -> moe_edge_status {
    guard(|| {
        // SAFETY: caller's contract.
        let s = unsafe { session_ref(session) }?;
        // SAFETY: caller's contract.
        let prompt = unsafe { utf8(prompt, "prompt") }?;
        // SAFETY: caller's contract.
        let params = generate_params(&s.model, &unsafe { read_params(params) }?)?;
        let tokenizer = tokenizer(&s.model)?;
        let mut state = lock(s)?;
        let session = match std::mem::replace(&mut *state, Mode::Fresh) {
            Mode::Fresh => None,
            Mode::Raw(session) => Some(*session),
            chat @ Mode::Chat(_) => {
                *state = chat;
                return Err(invalid(
                    "this session holds a conversation (moe_edge_chat); use another session or \
                     moe_edge_session_reset",
                ));
            }
        };
        let ids = match &session {
            None => tokenizer.encode(prompt)?,
            Some(_) => tokenizer.encode_raw(prompt)?,
        };
        if ids.is_empty() {
            if let Some(session) = session {
                *state = Mode::Raw(Box::new(session));
            }
            return Err(invalid("the prompt is empty"));
        }
        let session = match session {
            Some(session) => session,
            None => Session::new(&s.model)?,
        };
        let mut generator = Generator::with_session(&s.model, session, params)?;
        generator.set_cancel_handle(s.cancel.clone());
        let result = generator.generate(&ids, streamer(callback, user));
        let fed = ids.len();
        let g = match result {
            Ok(g) => g,
            Err(e) => {
                // the session's cache may hold part of the failed call: start over next time
                return Err(e.into());
            }
        };
        *state = Mode::Raw(Box::new(generator.into_session()));
        // SAFETY: caller's contract.
        unsafe { write_stats(stats, &g, fed) }
    })
}

/// Sends `message` as the user's next turn of the session's conversation and generates the
/// assistant's reply through the model's chat template, streaming pieces to `callback`. Only the
/// tokens after what the KV cache already holds are fed. `system` (may be NULL) sets the system
/// message (on the first turn, or to replace it). When the conversation outgrows the context, its
/// oldest turns are dropped.
///
/// # Safety
/// As `moe_edge_generate`; `message` and `system` (if not NULL) are NUL-terminated strings.
#[no_mangle]
pub unsafe extern "C" fn moe_edge_chat(
    session: *mut moe_edge_session,
    system: *const c_char,
    message: *const c_char,
    params: *const moe_edge_generate_params,
    callback: moe_edge_piece_callback,
    user: *mut c_void,
    stats: *mut moe_edge_generation_stats,
) -> moe_edge_status {
    guard(|| {
        // SAFETY: caller's contract.
        let s = unsafe { session_ref(session) }?;
        // SAFETY: caller's contract.
        let message = unsafe { utf8(message, "message") }?;
        let system = if system.is_null() {
            None
        } else {
            // SAFETY: not NULL, NUL-terminated (contract).
            Some(unsafe { utf8(system, "system") }?)
        };
        // SAFETY: caller's contract.
        let params = generate_params(&s.model, &unsafe { read_params(params) }?)?;
        let mut state = lock(s)?;
        if matches!(*state, Mode::Raw(_)) {
            return Err(invalid(
                "this session continues raw text (moe_edge_generate); use another session or \
                 moe_edge_session_reset",
            ));
        }
        if matches!(*state, Mode::Fresh) {
            // SAFETY: the model outlives the conversation: `s.model` (an Arc) is declared after
            // `state` in moe_edge_session, so the conversation is dropped first, and the Arc keeps
            // the Model at a stable address, never mutated, until then.
            let model: &'static Model = unsafe { &*Arc::as_ptr(&s.model) };
            *state = Mode::Chat(Box::new(Conversation::new(model)?));
        }
        let Mode::Chat(chat) = &mut *state else {
            unreachable!("set above")
        };
        if let Some(system) = system {
            chat.set_system(system);
        }
        // moe_edge_cancel sets the session's flag: the reply stops at its next step
        s.cancel.reset();
        let mut stream = streamer(callback, user);
        let g = chat.reply(message, params, |step| {
            if s.cancel.is_cancelled() {
                Flow::Stop
            } else {
                stream(step)
            }
        })?;
        let fed = chat.last_prefill_tokens();
        // SAFETY: caller's contract.
        unsafe { write_stats(stats, &g, fed) }
    })
}
