//! (placeholder with the agreed signatures; replaced by the real spool)
#![allow(unused_variables)]
use std::path::Path;

use super::{Envelope, MessageId};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Area {
    Queue,
    Replica,
}

#[derive(Debug, thiserror::Error)]
#[error("spool: {0}")]
pub struct SpoolError(String);

pub struct Spool;

impl Spool {
    pub fn open(root: &Path) -> Result<Spool, SpoolError> {
        todo!()
    }
    pub fn store(&self, area: Area, env: &Envelope, content: &[u8]) -> Result<(), SpoolError> {
        todo!()
    }
    pub fn load(&self, area: Area, id: &MessageId) -> Result<(Envelope, Vec<u8>), SpoolError> {
        todo!()
    }
    pub fn envelope(&self, area: Area, id: &MessageId) -> Result<Envelope, SpoolError> {
        todo!()
    }
    pub fn ids(&self, area: Area) -> Result<Vec<MessageId>, SpoolError> {
        todo!()
    }
    pub fn update(&self, area: Area, env: &Envelope) -> Result<(), SpoolError> {
        todo!()
    }
    pub fn remove(&self, area: Area, id: &MessageId) -> Result<bool, SpoolError> {
        todo!()
    }
    pub fn promote(&self, id: &MessageId) -> Result<(), SpoolError> {
        todo!()
    }
}
