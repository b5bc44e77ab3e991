//! The generation workers: a fixed number of sessions over one model (and its expert cache),
//! each on its own thread, fed from a bounded queue. A worker keeps its session between
//! requests and reuses the KV cache of the prefix a new prompt shares with it. A request whose
//! client went away stops at its next token.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};

use moe_edge_engine::{Flow, GenerateParams, Generation, Generator, Model, Session};
use tokio::sync::mpsc;

/// What a worker sends back for one request.
pub enum Event {
    /// Text produced by the next token (possibly empty).
    Piece(String),
    Done(Generation),
    Failed(String),
}

pub struct Job {
    pub prompt: Vec<i64>,
    pub params: GenerateParams,
    pub events: mpsc::Sender<Event>,
}

/// Counters for `/metrics`.
#[derive(Default)]
pub struct Metrics {
    pub requests: AtomicU64,
    pub rejected: AtomicU64,
    pub prompt_tokens: AtomicU64,
    pub generated_tokens: AtomicU64,
    pub decode_micros: AtomicU64,
    pub busy: AtomicUsize,
}

/// The queue in front of the workers.
pub struct Workers {
    queue: SyncSender<Job>,
    pub metrics: Arc<Metrics>,
}

impl Workers {
    /// Starts `parallel` workers behind a queue of `queue` waiting requests.
    pub fn start(model: Arc<Model>, parallel: usize, queue: usize) -> Workers {
        let (tx, rx) = sync_channel::<Job>(queue);
        let rx = Arc::new(Mutex::new(rx));
        let metrics = Arc::new(Metrics::default());
        for i in 0..parallel.max(1) {
            let (model, rx, metrics) = (model.clone(), rx.clone(), metrics.clone());
            std::thread::Builder::new()
                .name(format!("slot-{i}"))
                .spawn(move || work(&model, &rx, &metrics))
                .expect("spawning a worker thread");
        }
        Workers { queue: tx, metrics }
    }

    /// Queues a job; `false` when the queue is full.
    pub fn submit(&self, job: Job) -> bool {
        match self.queue.try_send(job) {
            Ok(()) => true,
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.metrics.rejected.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }
}

fn work(model: &Model, jobs: &Mutex<Receiver<Job>>, metrics: &Metrics) {
    let mut session: Option<Session> = None;
    loop {
        let job = {
            let rx = jobs.lock().unwrap_or_else(|e| e.into_inner());
            match rx.recv() {
                Ok(job) => job,
                Err(_) => return, // the server is gone
            }
        };
        metrics.busy.fetch_add(1, Ordering::Relaxed);
        let events = job.events.clone();
        let outcome = run(model, &mut session, job);
        metrics.busy.fetch_sub(1, Ordering::Relaxed);
        match outcome {
            Ok(g) => {
                metrics
                    .prompt_tokens
                    .fetch_add(g.prompt_ids.len() as u64, Ordering::Relaxed);
                metrics
                    .generated_tokens
                    .fetch_add(g.generated_ids.len() as u64, Ordering::Relaxed);
                metrics
                    .decode_micros
                    .fetch_add((g.decode_seconds * 1e6) as u64, Ordering::Relaxed);
                let _ = events.blocking_send(Event::Done(g));
            }
            Err(e) => {
                session = None;
                let _ = events.blocking_send(Event::Failed(format!("{e:#}")));
            }
        }
    }
}

/// One request on the worker's session: keeps the cache of the common prefix, feeds the rest.
fn run(
    model: &Model,
    session: &mut Option<Session>,
    job: Job,
) -> moe_edge_engine::Result<Generation> {
    let mut s = match session.take() {
        Some(s) => s,
        None => Session::new(model)?,
    };
    let common = s
        .tokens()
        .iter()
        .zip(&job.prompt)
        .take_while(|(a, b)| a == b)
        .count();
    let keep = common.min(job.prompt.len() - 1);
    s.truncate(keep)?;
    let mut generator = Generator::with_session(model, s, job.params)?;
    let events = job.events;
    let result = generator.generate(&job.prompt[keep..], |step| {
        match events.blocking_send(Event::Piece(step.text.clone())) {
            Ok(()) => Flow::Continue,
            Err(_) => Flow::Stop, // the client went away
        }
    });
    let mut g = result?;
    *session = Some(generator.into_session());
    // report the whole prompt, not only what was fed
    g.prompt_ids = job.prompt;
    Ok(g)
}
