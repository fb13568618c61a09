//! What culprit writes for people and programs: the trace report's schema, table and merge
//! ([`trace`]) and its self-contained HTML page ([`html`]). The audit, purge and eval reports live
//! with their commands; all of them share [`trace::OUTPUT_SCHEMA_VERSION`] (`docs/OUTPUT.md`).

pub mod html;
pub mod trace;
