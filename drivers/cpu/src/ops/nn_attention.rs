//! Attention (opset 23).

use crate::ops::Registry;

pub(super) fn register(_r: &mut Registry) {}
