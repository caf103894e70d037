//! Residual-stream hooks at every layer boundary (TransformerLens names).
//!
//! An *observer* receives the tensor; an *intervention* returns a replacement (same shape and
//! dtype). Hooks run in the order they were added. With no hook set, the forward pass does not
//! touch this module beyond one `is_empty` check.

use candle_core::{Result, Tensor};

/// A point in the residual stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum HookPoint {
    /// Token embedding output (`hook_embed`); equal to `ResidPre(0)`.
    Embed,
    /// Input of layer `l` (`blocks.{l}.hook_resid_pre`).
    ResidPre(usize),
    /// After the attention residual add of layer `l` (`blocks.{l}.hook_resid_mid`).
    ResidMid(usize),
    /// Output of layer `l` (`blocks.{l}.hook_resid_post`); the input of layer `l+1`.
    ResidPost(usize),
    /// After the final RMSNorm (`ln_final.hook_normalized`), the input of the LM head.
    FinalNorm,
}

impl HookPoint {
    /// The TransformerLens name.
    pub fn name(&self) -> String {
        match self {
            Self::Embed => "hook_embed".into(),
            Self::ResidPre(l) => format!("blocks.{l}.hook_resid_pre"),
            Self::ResidMid(l) => format!("blocks.{l}.hook_resid_mid"),
            Self::ResidPost(l) => format!("blocks.{l}.hook_resid_post"),
            Self::FinalNorm => "ln_final.hook_normalized".into(),
        }
    }

    /// Parse a TransformerLens name (the inverse of [`HookPoint::name`]).
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "hook_embed" => return Some(Self::Embed),
            "ln_final.hook_normalized" => return Some(Self::FinalNorm),
            _ => {}
        }
        let rest = s.strip_prefix("blocks.")?;
        let (l, hook) = rest.split_once('.')?;
        let l: usize = l.parse().ok()?;
        match hook {
            "hook_resid_pre" => Some(Self::ResidPre(l)),
            "hook_resid_mid" => Some(Self::ResidMid(l)),
            "hook_resid_post" => Some(Self::ResidPost(l)),
            _ => None,
        }
    }

    /// All residual points of a model with `n_layers` layers, in forward order.
    pub fn all(n_layers: usize) -> Vec<Self> {
        let mut v = vec![Self::Embed];
        for l in 0..n_layers {
            v.extend([Self::ResidPre(l), Self::ResidMid(l), Self::ResidPost(l)]);
        }
        v.push(Self::FinalNorm);
        v
    }
}

type ObserveFn<'a> = Box<dyn FnMut(HookPoint, &Tensor) -> Result<()> + 'a>;
type InterveneFn<'a> = Box<dyn FnMut(HookPoint, &Tensor) -> Result<Tensor> + 'a>;

enum Action<'a> {
    Observe(ObserveFn<'a>),
    Intervene(InterveneFn<'a>),
}

struct Hook<'a> {
    /// `None` = every point.
    at: Option<HookPoint>,
    action: Action<'a>,
}

/// A set of hooks for one forward pass (or one generation).
#[derive(Default)]
pub struct Hooks<'a> {
    hooks: Vec<Hook<'a>>,
}

impl<'a> Hooks<'a> {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn is_empty(&self) -> bool {
        self.hooks.is_empty()
    }

    /// Observe the tensor at `at` (`None`: at every point).
    pub fn observe(
        &mut self,
        at: Option<HookPoint>,
        f: impl FnMut(HookPoint, &Tensor) -> Result<()> + 'a,
    ) -> &mut Self {
        self.hooks.push(Hook { at, action: Action::Observe(Box::new(f)) });
        self
    }

    /// Replace the tensor at `at` (`None`: at every point) by what `f` returns.
    pub fn intervene(
        &mut self,
        at: Option<HookPoint>,
        f: impl FnMut(HookPoint, &Tensor) -> Result<Tensor> + 'a,
    ) -> &mut Self {
        self.hooks.push(Hook { at, action: Action::Intervene(Box::new(f)) });
        self
    }

    /// Run the hooks registered for `point` on `x`.
    pub(crate) fn run(&mut self, point: HookPoint, x: Tensor) -> Result<Tensor> {
        let mut x = x;
        for h in self.hooks.iter_mut() {
            if h.at.is_some_and(|p| p != point) {
                continue;
            }
            match &mut h.action {
                Action::Observe(f) => f(point, &x)?,
                Action::Intervene(f) => {
                    let y = f(point, &x)?;
                    if y.shape() != x.shape() {
                        candle_core::bail!(
                            "hook at {} returned shape {:?}, expected {:?}",
                            point.name(),
                            y.shape(),
                            x.shape()
                        );
                    }
                    x = y.to_dtype(x.dtype())?;
                }
            }
        }
        Ok(x)
    }
}

/// Run hooks if there are any (the zero-cost path when `hooks` is `None` or empty).
pub(crate) fn apply(hooks: &mut Option<&mut Hooks<'_>>, point: HookPoint, x: Tensor) -> Result<Tensor> {
    match hooks {
        Some(h) if !h.is_empty() => h.run(point, x),
        _ => Ok(x),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for p in HookPoint::all(3) {
            assert_eq!(HookPoint::parse(&p.name()), Some(p));
        }
        assert_eq!(HookPoint::parse("blocks.x.hook_resid_pre"), None);
    }
}
