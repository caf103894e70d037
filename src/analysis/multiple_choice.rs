//! Multiple-choice scoring as lm-evaluation-harness's `multiple_choice` tasks do it: an item's
//! prediction is the choice with the highest summed log-likelihood (`acc`), or the highest
//! log-likelihood per character of the choice text (`acc_norm`); ties go to the first choice
//! (numpy's argmax). Standard errors are the sample standard deviation of the per-item 0/1
//! scores over √n (the harness's `mean_stderr`).

/// One scored item: each choice's summed log-likelihood and its text's length in characters.
#[derive(Clone, Debug, PartialEq)]
pub struct ScoredItem {
    pub lls: Vec<f64>,
    /// Characters of each choice's text (without the target delimiter), as Python's `len`.
    pub choice_chars: Vec<usize>,
    pub gold: usize,
}

impl ScoredItem {
    /// The choice with the highest log-likelihood.
    pub fn pred(&self) -> usize {
        argmax(self.lls.iter().copied())
    }
    /// The choice with the highest log-likelihood per character.
    pub fn pred_norm(&self) -> usize {
        argmax(self.lls.iter().zip(&self.choice_chars).map(|(ll, &n)| ll / n as f64))
    }
}

/// Accuracy and its standard error under one rule.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Accuracy {
    pub acc: f64,
    pub stderr: f64,
}

/// `acc` and `acc_norm` over items.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Summary {
    pub items: usize,
    pub acc: Accuracy,
    pub acc_norm: Accuracy,
}

pub fn summarize(items: &[ScoredItem]) -> Summary {
    let hits: Vec<f64> = items.iter().map(|i| f64::from(u8::from(i.pred() == i.gold))).collect();
    let hits_norm: Vec<f64> = items.iter().map(|i| f64::from(u8::from(i.pred_norm() == i.gold))).collect();
    Summary { items: items.len(), acc: mean_with_stderr(&hits), acc_norm: mean_with_stderr(&hits_norm) }
}

/// The first index of the largest value (NaN never wins).
fn argmax(values: impl Iterator<Item = f64>) -> usize {
    let mut best = (0, f64::NEG_INFINITY);
    for (i, v) in values.enumerate() {
        if v > best.1 {
            best = (i, v);
        }
    }
    best.0
}

/// Mean, and sample standard deviation (n − 1) over √n; the error is NaN for fewer than two.
fn mean_with_stderr(xs: &[f64]) -> Accuracy {
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / n;
    let var = xs.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / (n - 1.0);
    Accuracy { acc: mean, stderr: (var.sqrt() / n.sqrt()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(lls: &[f64], chars: &[usize], gold: usize) -> ScoredItem {
        ScoredItem { lls: lls.to_vec(), choice_chars: chars.to_vec(), gold }
    }

    #[test]
    fn predictions_follow_the_harness_rules() {
        // The longer choice has the higher total but the lower per-character likelihood.
        let i = item(&[-4.0, -9.0], &[2, 10], 1);
        assert_eq!((i.pred(), i.pred_norm()), (0, 1));
        assert_eq!(item(&[-1.0, -1.0, -2.0], &[1, 1, 1], 1).pred(), 0, "ties go to the first choice");
        assert_eq!(item(&[f64::NAN, -3.0], &[1, 1], 1).pred(), 1, "NaN never wins");
    }

    #[test]
    fn accuracy_and_its_standard_error() {
        let items = [
            item(&[-1.0, -2.0], &[1, 1], 0),
            item(&[-1.0, -2.0], &[1, 1], 1),
            item(&[-3.0, -2.0], &[1, 1], 1),
            item(&[-3.0, -2.0], &[1, 1], 1),
        ];
        let s = summarize(&items);
        assert_eq!(s.items, 4);
        assert_eq!(s.acc.acc, 0.75);
        // Sample sd of [1, 0, 1, 1] is 0.5; over √4: 0.25.
        assert!((s.acc.stderr - 0.25).abs() < 1e-15, "{}", s.acc.stderr);
        assert!(summarize(&items[..1]).acc.stderr.is_nan(), "one item has no standard error");
    }
}
