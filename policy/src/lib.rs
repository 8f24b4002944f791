//! Policy: the image trust policy (containers-policy.json) and, later, the
//! deployment policy. Evaluation is pure so that every service that calls it
//! reaches the same decision.

pub mod reference;
