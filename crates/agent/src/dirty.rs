//! The marks the watches leave for the next round: which objects changed
//! since the last round took them in, or that a watch listed anew. The
//! caches and the claims book both mark; a round takes the marks.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use natgw_api::{Kind, ObjectRef};

/// The objects the watches saw change since the last round took them in.
#[derive(Default)]
pub struct Dirty {
    pub(crate) objects: BTreeSet<ObjectRef>,
    /// A watch listed anew: objects deleted meanwhile were never seen go.
    pub(crate) all: bool,
}

pub type DirtyCell = Arc<Mutex<Dirty>>;

fn mark(cell: &DirtyCell, f: impl FnOnce(&mut Dirty)) {
    f(&mut cell.lock().unwrap_or_else(|p| p.into_inner()));
}

/// Marks one object.
pub fn mark_one(cell: &DirtyCell, object: ObjectRef) {
    mark(cell, |d| {
        d.objects.insert(object);
    });
}

/// Marks Eips by name (their address claims changed).
pub fn mark_eips(cell: &DirtyCell, eips: impl IntoIterator<Item = String>) {
    mark(cell, |d| d.objects.extend(eips.into_iter().map(|n| ObjectRef::new(Kind::Eip, n))));
}

/// Marks everything: a watch listed anew.
pub fn mark_relisted(cell: &DirtyCell) {
    mark(cell, |d| d.all = true);
}

/// The marks so far, leaving none.
pub fn take(cell: &DirtyCell) -> Dirty {
    std::mem::take(&mut *cell.lock().unwrap_or_else(|p| p.into_inner()))
}
