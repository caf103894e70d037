//! The layered Hopfield network: its parameters, its state, the energy E, the cost C, and the
//! derivatives that relaxation (∂F/∂s), EP (∂E/∂θ) and implicit differentiation (H·v, ∂C/∂θ)
//! need.
//!
//! Layers are numbered 0..=L+1: 0 the clamped input x, 1..=L the hidden layers, L+1 the output
//! y (`vocab` units). Parameter index `k = l − 1` holds W_l (row-major `[n_l, n_{l−1}]`) and
//! b_l. The output is either a layer of the energy ([`Output::Layer`], relaxed with the rest)
//! or a softmax readout of the last hidden layer outside it ([`Output::Readout`]).

use crate::rng::SplitMix64;

/// The clamped input as (index, value) pairs: a context of one-hot tokens has only `context`
/// nonzero entries out of `context · vocab`, so products with W_1 skip the zeros.
pub type Input = [(usize, f64)];

/// Where the output units y sit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    /// A free layer of the energy, linear (ρ = identity): y = W_{L+1} ρ(h_L) + b_{L+1} + its
    /// own share of the relaxation, and it feeds back into h_L through W_{L+1}ᵀ y.
    Layer,
    /// Outside the energy: y = W_{L+1} ρ(h_L) + b_{L+1}, read out at equilibrium; only the
    /// hidden layers relax, and the cost depends on θ directly (Laborieux et al. 2021).
    Readout,
}

impl Output {
    pub const NAMES: [&'static str; 2] = ["readout", "layer"];

    pub fn parse(name: &str) -> Option<Output> {
        match name {
            "layer" => Some(Output::Layer),
            "readout" => Some(Output::Readout),
            _ => None,
        }
    }
}

/// Parameters θ = (W_l, b_l), l = 1..=L+1. Gradients and optimiser moments have the same shape,
/// so this type doubles as a vector in parameter space.
#[derive(Clone, Debug, PartialEq)]
pub struct Network {
    /// Units per layer, the input first: `[n_0, n_1, …, n_{L+1}]`.
    pub sizes: Vec<usize>,
    /// `weights[l − 1]` = W_l, row-major `[n_l, n_{l−1}]`.
    pub weights: Vec<Vec<f64>>,
    /// `biases[l − 1]` = b_l.
    pub biases: Vec<Vec<f64>>,
    pub output: Output,
}

/// The free units (`layers[l − 1]` = s_l): the hidden layers, and y with [`Output::Layer`].
/// The input is not part of the state.
#[derive(Clone, Debug, PartialEq)]
pub struct State {
    pub layers: Vec<Vec<f64>>,
}

impl State {
    /// max_i |a_i − b_i| over all units.
    pub fn max_diff(&self, other: &State) -> f64 {
        let pairs = self.layers.iter().zip(&other.layers).flat_map(|(a, b)| a.iter().zip(b));
        pairs.fold(0.0, |m, (x, y)| m.max((x - y).abs()))
    }
}

/// ρ of a free layer: tanh on hidden layers (smooth, bounded, so E is bounded below; gain 1 at 0),
/// the identity on an output layer (its units are the logits, unbounded).
#[derive(Clone, Copy)]
enum Rho {
    Tanh,
    Identity,
}

impl Rho {
    fn f(self, x: f64) -> f64 {
        match self {
            Rho::Tanh => x.tanh(),
            Rho::Identity => x,
        }
    }
    fn d(self, x: f64) -> f64 {
        match self {
            Rho::Tanh => 1.0 - x.tanh().powi(2),
            Rho::Identity => 1.0,
        }
    }
    fn dd(self, x: f64) -> f64 {
        match self {
            Rho::Tanh => {
                let t = x.tanh();
                -2.0 * t * (1.0 - t * t)
            }
            Rho::Identity => 0.0,
        }
    }
}

/// y ← y + a·x.
pub(super) fn axpy(y: &mut [f64], a: f64, x: &[f64]) {
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi += a * xi;
    }
}

/// out += W·v for row-major W `[rows, v.len()]`.
fn mat_vec_add(w: &[f64], v: &[f64], out: &mut [f64]) {
    for (o, row) in out.iter_mut().zip(w.chunks_exact(v.len())) {
        *o += row.iter().zip(v).map(|(a, b)| a * b).sum::<f64>();
    }
}

/// out += Wᵀ·v for row-major W `[v.len(), out.len()]`.
fn mat_t_vec_add(w: &[f64], v: &[f64], out: &mut [f64]) {
    for (row, &vi) in w.chunks_exact(out.len()).zip(v) {
        if vi != 0.0 {
            axpy(out, vi, row);
        }
    }
}

/// W += a · u vᵀ for row-major W `[u.len(), v.len()]`.
fn outer_add(w: &mut [f64], a: f64, u: &[f64], v: &[f64]) {
    for (row, &ui) in w.chunks_exact_mut(v.len()).zip(u) {
        if ui != 0.0 {
            axpy(row, a * ui, v);
        }
    }
}

/// W += a · u xᵀ for a sparse x.
fn outer_add_sparse(w: &mut [f64], cols: usize, a: f64, u: &[f64], x: &Input) {
    for (row, &ui) in w.chunks_exact_mut(cols).zip(u) {
        for &(j, xj) in x {
            row[j] += a * ui * xj;
        }
    }
}

/// Cross-entropy of softmax(y) against the target: logsumexp(y) − y_target (so exp of its mean
/// is the perplexity).
pub fn cross_entropy(y: &[f64], target: usize) -> f64 {
    let m = y.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    m + y.iter().map(|v| (v - m).exp()).sum::<f64>().ln() - y[target]
}

/// Its gradient in y: softmax(y) − onehot(target).
pub fn cross_entropy_grad(y: &[f64], target: usize) -> Vec<f64> {
    let m = y.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = y.iter().map(|v| (v - m).exp()).collect();
    let z: f64 = e.iter().sum();
    let mut g: Vec<f64> = e.iter().map(|v| v / z).collect();
    g[target] -= 1.0;
    g
}

impl Network {
    /// Random weights and zero biases, from `seed`. W_1 ~ N(0, gain²/a) with a = `input_active`
    /// (the nonzero inputs of an example, e.g. the context length for one-hot tokens): a unit
    /// drive. Above it W_l ~ N(0, gain²/(√n_{l−1} + √n_l)²), whose spectral norm is about
    /// `gain`: coupling between free layers is symmetric, so a larger norm makes the energy
    /// non-convex (positive feedback through W_lᵀW_l) and relaxation slow from the start.
    pub fn init(sizes: &[usize], output: Output, input_active: usize, gain: f64, seed: u64) -> Network {
        let min = if output == Output::Readout { 3 } else { 2 };
        assert!(sizes.len() >= min, "{output:?}: too few layers in {sizes:?}");
        let mut rng = SplitMix64::keyed(seed, &[0xE9]);
        let mut weights = Vec::new();
        for l in 1..sizes.len() {
            let spread = if l == 1 {
                (input_active.max(1) as f64).sqrt()
            } else {
                (sizes[l - 1] as f64).sqrt() + (sizes[l] as f64).sqrt()
            };
            let std = gain / spread;
            weights.push((0..sizes[l] * sizes[l - 1]).map(|_| std * rng.normal()).collect());
        }
        let biases = sizes[1..].iter().map(|&n| vec![0.0; n]).collect();
        Network { sizes: sizes.to_vec(), weights, biases, output }
    }

    /// The same shape, all zeros: a gradient accumulator.
    pub fn zeros_like(&self) -> Network {
        Network {
            sizes: self.sizes.clone(),
            weights: self.weights.iter().map(|w| vec![0.0; w.len()]).collect(),
            biases: self.biases.iter().map(|b| vec![0.0; b.len()]).collect(),
            output: self.output,
        }
    }

    /// Every parameter tensor in a fixed order (W_1, b_1, W_2, b_2, …).
    pub fn tensors(&self) -> impl Iterator<Item = &Vec<f64>> {
        self.weights.iter().zip(&self.biases).flat_map(|(w, b)| [w, b])
    }

    pub fn tensors_mut(&mut self) -> impl Iterator<Item = &mut Vec<f64>> {
        self.weights.iter_mut().zip(self.biases.iter_mut()).flat_map(|(w, b)| [w, b])
    }

    /// Number of parameters.
    pub fn count(&self) -> usize {
        self.tensors().map(Vec::len).sum()
    }

    /// self ← self + a·other (same shapes).
    pub fn add_scaled(&mut self, a: f64, other: &Network) {
        for (x, y) in self.tensors_mut().zip(other.tensors()) {
            axpy(x, a, y);
        }
    }

    pub fn dot(&self, other: &Network) -> f64 {
        self.tensors().zip(other.tensors()).map(|(x, y)| x.iter().zip(y).map(|(a, b)| a * b).sum::<f64>()).sum()
    }

    pub fn norm(&self) -> f64 {
        self.dot(self).sqrt()
    }

    /// Cosine between two parameter vectors (0 when either is zero).
    pub fn cosine(&self, other: &Network) -> f64 {
        let d = self.norm() * other.norm();
        if d == 0.0 {
            0.0
        } else {
            (self.dot(other) / d).clamp(-1.0, 1.0)
        }
    }

    /// Number of relaxed layers: L + 1 with an output layer, L with a readout.
    pub fn free_layers(&self) -> usize {
        self.sizes.len() - 1 - usize::from(self.output == Output::Readout)
    }

    fn rho(&self, k: usize) -> Rho {
        if self.output == Output::Layer && k + 1 == self.free_layers() {
            Rho::Identity
        } else {
            Rho::Tanh
        }
    }

    /// The zero state.
    pub fn zero_state(&self) -> State {
        State { layers: self.sizes[1..=self.free_layers()].iter().map(|&n| vec![0.0; n]).collect() }
    }

    /// The feedforward guess s_l = W_l ρ(s_{l−1}) + b_l (feedback ignored): where relaxation
    /// starts, close to the equilibrium while the weights are small.
    pub fn feedforward(&self, x: &Input) -> State {
        let mut s = self.zero_state();
        for k in 0..self.free_layers() {
            let mut u = self.biases[k].clone();
            if k == 0 {
                self.input_drive_add(x, &mut u);
            } else {
                let r: Vec<f64> = s.layers[k - 1].iter().map(|&v| self.rho(k - 1).f(v)).collect();
                mat_vec_add(&self.weights[k], &r, &mut u);
            }
            s.layers[k] = u;
        }
        s
    }

    /// u += W_1 x.
    fn input_drive_add(&self, x: &Input, u: &mut [f64]) {
        let cols = self.sizes[0];
        for (ui, row) in u.iter_mut().zip(self.weights[0].chunks_exact(cols)) {
            *ui += x.iter().map(|&(j, xj)| row[j] * xj).sum::<f64>();
        }
    }

    /// ρ(s_l) for every free layer.
    pub fn rates(&self, s: &State) -> Vec<Vec<f64>> {
        s.layers.iter().enumerate().map(|(k, v)| v.iter().map(|&x| self.rho(k).f(x)).collect()).collect()
    }

    /// ρ'(s_l) ⊙ v_l for every free layer.
    fn rho_d_times(&self, s: &State, v: &State) -> Vec<Vec<f64>> {
        let layer = |k: usize| s.layers[k].iter().zip(&v.layers[k]).map(|(&sv, &vv)| self.rho(k).d(sv) * vv).collect();
        (0..self.free_layers()).map(layer).collect()
    }

    /// The drive of each free layer: a_l = W_l ρ(s_{l−1}) + b_l + W_{l+1}ᵀ ρ(s_{l+1}) (the last
    /// term between free layers only), so that ∂E/∂s_l = s_l − ρ'(s_l) ⊙ a_l.
    fn drives(&self, x: &Input, r: &[Vec<f64>]) -> Vec<Vec<f64>> {
        let n = self.free_layers();
        (0..n)
            .map(|k| {
                let mut a = self.biases[k].clone();
                if k == 0 {
                    self.input_drive_add(x, &mut a);
                } else {
                    mat_vec_add(&self.weights[k], &r[k - 1], &mut a);
                }
                if k + 1 < n {
                    mat_t_vec_add(&self.weights[k + 1], &r[k + 1], &mut a);
                }
                a
            })
            .collect()
    }

    /// E(s) = ½Σ‖s_l‖² − Σ_l ρ(s_l)ᵀ (W_l ρ(s_{l−1}) + b_l) over the free layers, ρ(s_0) = x.
    pub fn energy(&self, x: &Input, s: &State) -> f64 {
        self.energy_and_grad(x, s).0
    }

    /// ∂E/∂s for every free layer.
    pub fn energy_grad_s(&self, x: &Input, s: &State) -> State {
        self.energy_and_grad(x, s).1
    }

    /// E(s) and ∂E/∂s together: both need the bottom-up products u_l = W_l ρ(s_{l−1}) + b_l;
    /// ∂E/∂s_l = s_l − ρ'(s_l) ⊙ (u_l + W_{l+1}ᵀ ρ(s_{l+1})).
    pub fn energy_and_grad(&self, x: &Input, s: &State) -> (f64, State) {
        let n = self.free_layers();
        let r = self.rates(s);
        let mut e = 0.5 * s.layers.iter().flatten().map(|v| v * v).sum::<f64>();
        let mut layers = Vec::with_capacity(n);
        for k in 0..n {
            let mut a = self.biases[k].clone();
            if k == 0 {
                self.input_drive_add(x, &mut a);
            } else {
                mat_vec_add(&self.weights[k], &r[k - 1], &mut a);
            }
            e -= r[k].iter().zip(&a).map(|(p, q)| p * q).sum::<f64>();
            if k + 1 < n {
                mat_t_vec_add(&self.weights[k + 1], &r[k + 1], &mut a);
            }
            let rho = self.rho(k);
            layers.push(s.layers[k].iter().zip(&a).map(|(&v, &d)| v - rho.d(v) * d).collect());
        }
        (e, State { layers })
    }

    /// out += scale · ∂E/∂θ at s: ∂E/∂W_l = −ρ(s_l) ρ(s_{l−1})ᵀ, ∂E/∂b_l = −ρ(s_l) (a readout's
    /// parameters are not in E).
    pub fn add_energy_grad_theta(&self, x: &Input, s: &State, scale: f64, out: &mut Network) {
        let r = self.rates(s);
        for k in 0..self.free_layers() {
            if k == 0 {
                outer_add_sparse(&mut out.weights[0], self.sizes[0], -scale, &r[0], x);
            } else {
                outer_add(&mut out.weights[k], -scale, &r[k], &r[k - 1]);
            }
            axpy(&mut out.biases[k], -scale, &r[k]);
        }
    }

    /// H·v, H = ∂²E/∂s² at s (the input is clamped, so v has no input part):
    /// (Hv)_l = v_l − ρ''(s_l)⊙a_l⊙v_l − ρ'(s_l)⊙(W_l (ρ'(s_{l−1})⊙v_{l−1}) + W_{l+1}ᵀ(ρ'(s_{l+1})⊙v_{l+1})).
    pub fn hessian_vec(&self, x: &Input, s: &State, v: &State) -> State {
        let n = self.free_layers();
        let a = self.drives(x, &self.rates(s));
        let dv = self.rho_d_times(s, v);
        let layers = (0..n)
            .map(|k| {
                let mut c = vec![0.0; self.sizes[k + 1]];
                if k > 0 {
                    mat_vec_add(&self.weights[k], &dv[k - 1], &mut c);
                }
                if k + 1 < n {
                    mat_t_vec_add(&self.weights[k + 1], &dv[k + 1], &mut c);
                }
                let rho = self.rho(k);
                (0..c.len())
                    .map(|i| {
                        let (sv, vv) = (s.layers[k][i], v.layers[k][i]);
                        vv - rho.dd(sv) * a[k][i] * vv - rho.d(sv) * c[i]
                    })
                    .collect()
            })
            .collect();
        State { layers }
    }

    /// The logits y at state s: the output layer itself, or the readout of the last hidden layer.
    pub fn logits(&self, s: &State) -> Vec<f64> {
        let last = s.layers.last().expect("a network has a free layer");
        match self.output {
            Output::Layer => last.clone(),
            Output::Readout => {
                let k = self.sizes.len() - 2;
                let r: Vec<f64> = last.iter().map(|&v| self.rho(k - 1).f(v)).collect();
                let mut y = self.biases[k].clone();
                mat_vec_add(&self.weights[k], &r, &mut y);
                y
            }
        }
    }

    /// The cost C(s) = cross-entropy of softmax(logits) against the target.
    pub fn cost(&self, s: &State, target: usize) -> f64 {
        cross_entropy(&self.logits(s), target)
    }

    /// ∂C/∂s: nonzero on the last free layer only (a readout's: ρ'(h_L) ⊙ W_{L+1}ᵀ (p − onehot)).
    pub fn cost_grad_s(&self, s: &State, target: usize) -> State {
        let dy = cross_entropy_grad(&self.logits(s), target);
        let mut g = self.zero_state();
        let n = self.free_layers();
        g.layers[n - 1] = match self.output {
            Output::Layer => dy,
            Output::Readout => {
                let mut back = vec![0.0; self.sizes[n]];
                mat_t_vec_add(&self.weights[n], &dy, &mut back);
                s.layers[n - 1].iter().zip(&back).map(|(&v, &b)| self.rho(n - 1).d(v) * b).collect()
            }
        };
        g
    }

    /// out += scale · ∂C/∂θ at s, the cost's direct dependence on θ: a readout's
    /// ∂C/∂W_{L+1} = (p − onehot) ρ(h_L)ᵀ, ∂C/∂b_{L+1} = p − onehot; nothing for an output layer.
    pub fn add_cost_grad_theta(&self, s: &State, target: usize, scale: f64, out: &mut Network) {
        if self.output == Output::Layer {
            return;
        }
        let k = self.sizes.len() - 2;
        let dy = cross_entropy_grad(&self.logits(s), target);
        let r: Vec<f64> = s.layers[k - 1].iter().map(|&v| self.rho(k - 1).f(v)).collect();
        outer_add(&mut out.weights[k], scale, &dy, &r);
        axpy(&mut out.biases[k], scale, &dy);
    }

    /// The energy's share of dL/dθ from the adjoint λ = H⁻¹ ∂C/∂s at the equilibrium s*:
    /// −λᵀ ∂²E/∂s∂θ, i.e. (ρ'(s_l)⊙λ_l) ρ(s_{l−1})ᵀ + ρ(s_l) (ρ'(s_{l−1})⊙λ_{l−1})ᵀ for W_l (the
    /// second term absent for the clamped input) and ρ'(s_l)⊙λ_l for b_l; added to `out` times
    /// `scale`.
    pub fn add_adjoint_grad(&self, x: &Input, s: &State, lambda: &State, scale: f64, out: &mut Network) {
        let r = self.rates(s);
        let dl = self.rho_d_times(s, lambda);
        for k in 0..self.free_layers() {
            if k == 0 {
                outer_add_sparse(&mut out.weights[0], self.sizes[0], scale, &dl[0], x);
            } else {
                outer_add(&mut out.weights[k], scale, &dl[k], &r[k - 1]);
                outer_add(&mut out.weights[k], scale, &r[k], &dl[k - 1]);
            }
            axpy(&mut out.biases[k], scale, &dl[k]);
        }
    }
}
