//! Logged drops from the programs' ring buffer, and their aya-log debug lines.

use std::{
    collections::VecDeque,
    os::fd::AsRawFd as _,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::Result;
use aya::maps::{MapData, RingBuf};
use isolation_common::{LogEvent, maps};

use super::{attach, counters, pinned::open_map};
use crate::{
    backend::{Event, Events, LogCounts},
    state::Paths,
};

/// Collects the programs' aya-log lines for the reader to hand out.
#[derive(Clone, Default)]
struct Collect(Arc<Mutex<VecDeque<String>>>);

impl log::Log for Collect {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }
    fn log(&self, r: &log::Record<'_>) {
        if let Ok(mut q) = self.0.lock() {
            q.push_back(format!(
                "{}: {}",
                r.level().as_str().to_lowercase(),
                r.args()
            ));
        }
    }
    fn flush(&self) {}
}

pub struct Ring {
    paths: Paths,
    rb: RingBuf<MapData>,
    debug: Option<(aya_log::EbpfLogger<Collect>, Collect)>,
}

impl Ring {
    pub fn open(paths: &Paths, debug: bool) -> Result<Ring> {
        let rb: RingBuf<MapData> = open_map(paths, maps::EVENTS)?.try_into()?;
        let debug = if debug {
            let id = attach::pinned_xdp_id(paths)?;
            let c = Collect::default();
            let l = aya_log::EbpfLogger::init_from_id_with_logger(id, c.clone())
                .map_err(|e| anyhow::anyhow!("cannot read the programs' debug log: {e}"))?;
            Some((l, c))
        } else {
            None
        };
        Ok(Ring {
            paths: paths.clone(),
            rb,
            debug,
        })
    }

    fn pending_debug(&mut self) -> Option<String> {
        let (l, c) = self.debug.as_mut()?;
        l.flush();
        c.0.lock().ok()?.pop_front()
    }
}

impl Events for Ring {
    fn next(&mut self, wait: Duration) -> Result<Option<Event>> {
        let deadline = Instant::now() + wait;
        loop {
            if let Some(line) = self.pending_debug() {
                return Ok(Some(Event::Debug(line)));
            }
            while let Some(item) = self.rb.next() {
                if item.len() >= std::mem::size_of::<LogEvent>() {
                    let e: LogEvent =
                        *bytemuck::from_bytes(&item[..std::mem::size_of::<LogEvent>()]);
                    return Ok(Some(Event::Log(e)));
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            let mut pfd = libc::pollfd {
                fd: self.rb.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            let ms = left.as_millis().min(200) as i32;
            // SAFETY: one valid pollfd, for the duration of the call.
            unsafe { libc::poll(&mut pfd, 1, ms) };
        }
    }

    fn counts(&self) -> Result<LogCounts> {
        counters::log_counts(&self.paths)
    }
}
