//! safe-detach: resolves stuck volume attachments, changing the record only after the storage
//! backend confirms.

pub mod api;
pub mod decide;
pub mod driver;
