//! Perplexity from summed negative log-likelihoods.

/// Sums NLL (nats) over scored tokens; order-independent up to f64 rounding.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct NllSum {
    pub nll: f64,
    pub tokens: u64,
}

impl NllSum {
    pub fn add(&mut self, nll: f64, tokens: u64) {
        self.nll += nll;
        self.tokens += tokens;
    }
    /// Mean NLL per scored token (nats).
    pub fn mean(&self) -> f64 {
        if self.tokens == 0 {
            f64::NAN
        } else {
            self.nll / self.tokens as f64
        }
    }
    /// exp(mean NLL).
    pub fn perplexity(&self) -> f64 {
        self.mean().exp()
    }
    /// Bits per byte of the scored text: total NLL / bytes / ln 2 (tokenizer-independent).
    pub fn bits_per_byte(&self, bytes: u64) -> f64 {
        if bytes == 0 {
            f64::NAN
        } else {
            self.nll / bytes as f64 / std::f64::consts::LN_2
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniform_model_has_perplexity_equal_to_vocabulary() {
        let mut s = NllSum::default();
        let v: f64 = 50.0;
        s.add(v.ln() * 10.0, 10);
        s.add(v.ln() * 6.0, 6);
        assert!((s.perplexity() - 50.0).abs() < 1e-9);
        assert!((s.mean() - v.ln()).abs() < 1e-12);
        // 16 tokens of ln 50 nats over 32 bytes: 8·log2(50)/… per byte.
        assert!((s.bits_per_byte(32) - 16.0 * v.log2() / 32.0).abs() < 1e-9);
    }

    #[test]
    fn empty_sum_is_nan_not_a_number_that_looks_real() {
        assert!(NllSum::default().perplexity().is_nan());
        assert!(NllSum::default().bits_per_byte(0).is_nan());
    }
}
