//! Stage kinds end to end through the `rpt-flow` CLI, checked against independent references.

mod ppl_parity;
