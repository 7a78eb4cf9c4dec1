//! `--output json`: one event per line on stdout, each stamped with the time.

use imgbuild_core::{Event, EventSink};
use std::io::Write;
use std::sync::Mutex;

pub struct JsonSink {
    out: Mutex<std::io::Stdout>,
}

impl JsonSink {
    pub fn new() -> Self {
        JsonSink {
            out: Mutex::new(std::io::stdout()),
        }
    }
}

impl Default for JsonSink {
    fn default() -> Self {
        Self::new()
    }
}

impl EventSink for JsonSink {
    fn emit(&self, event: &Event) {
        let mut value = serde_json::to_value(event).expect("events always serialize");
        if let Some(object) = value.as_object_mut() {
            let now = time::OffsetDateTime::now_utc()
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default();
            object.insert("time".into(), now.into());
        }
        let mut out = self.out.lock().expect("stdout lock poisoned");
        // A closed stdout (`| head`) must not kill a build that is cleaning up.
        let _ = writeln!(out, "{value}");
        let _ = out.flush();
    }
}
