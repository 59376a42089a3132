#![doc = include_str!("../README.md")]

pub mod args;
pub mod commands;
pub mod dump;
pub mod error;
pub mod render;
pub mod transfer;
pub mod verify;

pub use error::CliError;
pub use transfer::{copy, export, import, ImportReport, Importer};
pub use verify::{verify, StreamDifference, VerifyReport};
