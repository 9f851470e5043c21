//! The daemon's latest warnings and errors, kept in memory for `lazy-erofs status`: a
//! tracing layer beside the log writer (bounded: the oldest go first).

use std::collections::VecDeque;
use std::fmt::Write;
use std::sync::Mutex;

use lazy_erofs_snapshotter::admin::LogEntry;
use tracing::field::{Field, Visit};

/// How many are kept.
const KEPT: usize = 20;

static RECENT: Mutex<VecDeque<LogEntry>> = Mutex::new(VecDeque::new());

/// The kept entries, oldest first.
pub fn recent() -> Vec<LogEntry> {
    RECENT
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .iter()
        .cloned()
        .collect()
}

pub struct Layer;

#[derive(Default)]
struct Text {
    message: String,
    fields: String,
}

impl Visit for Text {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.message, "{value:?}");
        } else {
            let _ = write!(self.fields, " {}={value:?}", field.name());
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message.push_str(value);
        } else {
            let _ = write!(self.fields, " {}={value}", field.name());
        }
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Layer {
    fn on_event(
        &self,
        event: &tracing::Event<'_>,
        _ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        let level = *event.metadata().level();
        if level > tracing::Level::WARN {
            return;
        }
        let mut text = Text::default();
        event.record(&mut text);
        let entry = LogEntry {
            at: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            level: level.to_string(),
            message: format!("{}{}", text.message, text.fields),
        };
        let mut recent = RECENT
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if recent.len() == KEPT {
            recent.pop_front();
        }
        recent.push_back(entry);
    }
}
