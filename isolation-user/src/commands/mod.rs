//! One module per verb, each with its clap arguments and a `run`.
pub mod apply;
pub mod block;
pub mod check;
pub mod docs;
pub mod edit;
pub mod export;
pub mod fleet;
pub mod import;
pub mod load;
pub mod run;
pub mod stats;
pub mod status;
pub mod trace;
pub mod whitelist;
