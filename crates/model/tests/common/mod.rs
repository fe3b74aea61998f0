//! Test helpers: the tiny synthetic model and the independent f64 reference forward pass.

#![allow(dead_code)]

pub mod reference;
pub mod tiny;
