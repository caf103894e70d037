//! The theorem, tested: EP's estimate converges to the true gradient as β → 0 (linearly, and
//! quadratically when symmetric), the true gradient is the finite-difference derivative of
//! C(s*(θ)), the energy falls during relaxation, and the update has the weights' shapes.

use super::*;

type Case = (Network, Vec<(usize, f64)>, usize);

/// 3 inputs, 4 hidden units, 2 outputs, weights large enough that tanh is not linear.
fn tiny(output: Output) -> Case {
    let net = Network::init(&[3, 4, 2], output, 3, 1.5, 7);
    (net, vec![(0, 0.7), (1, -1.2), (2, 0.4)], 1)
}

/// Two hidden layers, for the terms between free layers.
fn deeper(output: Output) -> Case {
    let mut net = Network::init(&[3, 4, 3, 2], output, 3, 1.5, 11);
    net.biases[1] = vec![0.1, -0.2, 0.3];
    (net, vec![(0, 0.5), (2, -0.9)], 0)
}

/// Both networks with the output as a layer of the energy and as a readout.
fn cases() -> Vec<(&'static str, Case)> {
    let mut out = Vec::new();
    for o in [Output::Layer, Output::Readout] {
        out.push((if o == Output::Layer { "3-4-2 layer" } else { "3-4-2 readout" }, tiny(o)));
        out.push((if o == Output::Layer { "3-4-3-2 layer" } else { "3-4-3-2 readout" }, deeper(o)));
    }
    out
}

const TIGHT: Relax = Relax { eta: 0.5, max_steps: 200_000, tol: 1e-14 };
const CG: Cg = Cg { tol: 1e-13, max_iter: 1000 };

fn rel_err(a: &Network, b: &Network) -> f64 {
    let mut d = a.clone();
    d.add_scaled(-1.0, b);
    d.norm() / b.norm()
}

fn equilibrium(net: &Network, x: &Input) -> State {
    let (s, r) = free_phase(net, x, &TIGHT).unwrap();
    assert!(r.converged, "free phase: {r:?}");
    s
}

/// Relative errors of EP at β = 0.04, 0.02, …, and their ratios between successive halvings.
fn ep_errors(net: &Network, x: &Input, t: usize, symmetric: bool) -> (Vec<f64>, Vec<f64>) {
    let s = equilibrium(net, x);
    let (truth, _) = true_gradient(net, x, t, &s, &CG).unwrap();
    let errs: Vec<f64> = [0.04, 0.02, 0.01, 0.005]
        .iter()
        .map(|&beta| {
            let (g, rs) = ep_gradient(net, x, t, &s, beta, symmetric, &TIGHT).unwrap();
            assert!(rs.iter().all(|r| r.converged));
            rel_err(&g, &truth)
        })
        .collect();
    let ratios = errs.windows(2).map(|w| w[0] / w[1]).collect();
    (errs, ratios)
}

fn sci(v: &[f64]) -> String {
    v.iter().map(|e| format!("{e:.3e}")).collect::<Vec<_>>().join(", ")
}

#[test]
fn ep_converges_to_the_true_gradient_linearly_in_beta() {
    for (name, (net, x, t)) in cases() {
        let (errs, ratios) = ep_errors(&net, &x, t, false);
        eprintln!("{name}: one-sided EP: relative errors {}, ratios {ratios:.3?}", sci(&errs));
        assert!(errs[0] < 0.1, "already close at β = 0.04: {errs:?}");
        for r in &ratios {
            assert!((1.8..2.2).contains(r), "halving β halves the error: {ratios:?}");
        }
    }
}

#[test]
fn symmetric_ep_converges_quadratically_in_beta() {
    for (name, (net, x, t)) in cases() {
        let (errs, ratios) = ep_errors(&net, &x, t, true);
        eprintln!("{name}: symmetric EP: relative errors {}, ratios {ratios:.3?}", sci(&errs));
        let (one_sided, _) = ep_errors(&net, &x, t, false);
        assert!(errs[0] < one_sided[0] / 5.0, "symmetric is far closer: {errs:?} vs {one_sided:?}");
        for r in &ratios {
            assert!((3.6..4.4).contains(r), "halving β quarters the error: {ratios:?}");
        }
    }
}

/// L(θ) = C(s*(θ)) with the equilibrium relaxed tightly from scratch.
fn loss_at(net: &Network, x: &Input, t: usize) -> f64 {
    net.cost(&equilibrium(net, x), t)
}

#[test]
fn the_true_gradient_is_the_derivative_of_the_loss_at_equilibrium() {
    for (name, (net, x, t)) in cases() {
        let s = equilibrium(&net, &x);
        let (g, iters) = true_gradient(&net, &x, t, &s, &CG).unwrap();
        assert!(iters > 0);
        let h = 1e-5;
        let mut fd = net.zeros_like();
        let n_tensors = net.tensors().count();
        for k in 0..n_tensors {
            for i in 0..net.tensors().nth(k).unwrap().len() {
                let mut plus = net.clone();
                plus.tensors_mut().nth(k).unwrap()[i] += h;
                let mut minus = net.clone();
                minus.tensors_mut().nth(k).unwrap()[i] -= h;
                fd.tensors_mut().nth(k).unwrap()[i] = (loss_at(&plus, &x, t) - loss_at(&minus, &x, t)) / (2.0 * h);
            }
        }
        let e = rel_err(&g, &fd);
        eprintln!("{name}: implicit gradient vs central differences: relative error {e:.2e}");
        assert!(e < 1e-6, "{e}");
        // The input layer's gradient is nonzero only in the columns of nonzero inputs.
        let cols = net.sizes[0];
        let silent: Vec<usize> = (0..cols).filter(|j| !x.iter().any(|p| p.0 == *j)).collect();
        for row in g.weights[0].chunks(cols) {
            assert!(silent.iter().all(|&j| row[j] == 0.0));
        }
    }
}

#[test]
fn the_hessian_product_is_the_derivative_of_the_energy_gradient() {
    let (net, x, _) = deeper(Output::Layer);
    let mut s = net.feedforward(&x);
    s.layers[0][1] += 0.3; // off equilibrium: the ρ'' term matters
    let mut v = net.zero_state();
    for (k, l) in v.layers.iter_mut().enumerate() {
        for (i, e) in l.iter_mut().enumerate() {
            *e = ((k * 7 + i * 3) % 5) as f64 / 5.0 - 0.4;
        }
    }
    let h = 1e-6;
    let shifted = |c: f64| {
        let mut t = s.clone();
        for (tl, vl) in t.layers.iter_mut().zip(&v.layers) {
            for (a, b) in tl.iter_mut().zip(vl) {
                *a += c * b;
            }
        }
        net.energy_grad_s(&x, &t)
    };
    let (gp, gm) = (shifted(h), shifted(-h));
    let hv = net.hessian_vec(&x, &s, &v);
    for k in 0..hv.layers.len() {
        for i in 0..hv.layers[k].len() {
            let fd = (gp.layers[k][i] - gm.layers[k][i]) / (2.0 * h);
            assert!((fd - hv.layers[k][i]).abs() < 1e-7, "layer {k} unit {i}: {fd} vs {}", hv.layers[k][i]);
        }
    }
}

#[test]
fn energy_falls_monotonically_during_both_phases() {
    for (name, (net, x, t)) in cases() {
        let slow = Relax { eta: 0.1, max_steps: 5000, tol: 1e-12 };
        let mut s = net.zero_state();
        let mut energies = vec![net.energy(&x, &s)];
        let r = relax_observed(&net, &x, None, &mut s, &slow, |s| energies.push(net.energy(&x, s))).unwrap();
        assert!(r.converged && energies.len() > 20, "{name}: {r:?}");
        assert_eq!(r.halvings, 0, "{name}: η = 0.1 is small enough: the plain iteration");
        // Up to rounding: near the minimum a step changes E by less than its last bits.
        let falls = |v: &[f64]| v.windows(2).all(|w| w[1] <= w[0] + 1e-14);
        assert!(falls(&energies), "{name}: free phase: E rose");
        assert!(energies[0] - energies.last().unwrap() > 1e-3, "{name}: and fell by something");
        let beta = 0.5;
        let f = |s: &State| net.energy(&x, s) + beta * net.cost(s, t);
        let mut fs = vec![f(&s)];
        let nudge = Some(Nudge { target: t, beta });
        let r = relax_observed(&net, &x, nudge, &mut s, &slow, |s| fs.push(f(s))).unwrap();
        assert_eq!(r.halvings, 0);
        assert!(falls(&fs), "{name}: nudged phase: F rose");
        assert!(fs[0] > *fs.last().unwrap(), "{name}: the nudge moved the state");
    }
}

/// With η beyond 2 / the largest curvature plain descent oscillates; the halving keeps E falling
/// and still reaches the same equilibrium.
#[test]
fn too_large_a_step_is_halved_and_still_converges() {
    let (net, x, _) = deeper(Output::Layer);
    let reference = equilibrium(&net, &x);
    let mut s = net.feedforward(&x);
    let mut energies = vec![net.energy(&x, &s)];
    let big = Relax { eta: 3.0, max_steps: 100_000, tol: 1e-13 };
    let r = relax_observed(&net, &x, None, &mut s, &big, |s| energies.push(net.energy(&x, s))).unwrap();
    assert!(r.converged && r.halvings > 0, "{r:?}");
    assert!(energies.windows(2).all(|w| w[1] <= w[0] + 1e-12 * (1.0 + w[0].abs())));
    assert!(s.max_diff(&reference) < 1e-10);
}

#[test]
fn the_equilibrium_is_a_stationary_point_and_the_nudge_lowers_the_cost() {
    for (name, (net, x, t)) in cases() {
        let s = equilibrium(&net, &x);
        let g = net.energy_grad_s(&x, &s);
        assert!(g.layers.iter().flatten().all(|v| v.abs() < 1e-13), "{name}");
        let mut n = s.clone();
        relax(&net, &x, Some(Nudge { target: t, beta: 0.5 }), &mut n, &TIGHT).unwrap();
        assert!(net.cost(&n, t) < net.cost(&s, t), "{name}");
    }
}

/// The original code's failure: its update never had the weights' shapes.
#[test]
fn every_update_has_the_shape_of_its_parameter() {
    for (name, (net, x, t)) in cases() {
        let s = equilibrium(&net, &x);
        let shapes = |n: &Network| n.tensors().map(Vec::len).collect::<Vec<_>>();
        for symmetric in [false, true] {
            let (g, _) = ep_gradient(&net, &x, t, &s, 0.1, symmetric, &TIGHT).unwrap();
            assert_eq!(shapes(&g), shapes(&net), "{name}");
        }
        assert_eq!(shapes(&true_gradient(&net, &x, t, &s, &CG).unwrap().0), shapes(&net), "{name}");
    }
    assert_eq!(deeper(Output::Readout).0.tensors().map(Vec::len).collect::<Vec<_>>(), [12, 4, 12, 3, 6, 2]);
}

const STEPS: usize = 200;

/// A task that needs the hidden layer (XOR of two one-hot features): every method learns it.
#[test]
fn every_method_learns_xor() {
    let examples: Vec<Example> = (0..4)
        .map(|i| {
            let (a, b) = (i & 1, i >> 1);
            Example { input: vec![(a, 1.0), (2 + b, 1.0)], target: a ^ b }
        })
        .collect();
    for (method, output) in [Method::Ep, Method::EpSymmetric, Method::Backprop]
        .into_iter()
        .flat_map(|m| [(m, Output::Layer), (m, Output::Readout)])
    {
        let mut net = Network::init(&[4, 16, 2], output, 2, 1.0, 3);
        let relax = Relax { eta: 0.5, max_steps: 2000, tol: 1e-9 };
        let settings = Settings { method, beta: 0.1, free: relax, nudged: relax, cg: CG };
        let mut opt = Optimizer::new("adam", &net).unwrap();
        let (before, _) = mean_cost(&net, &examples, &relax).unwrap();
        for _ in 0..STEPS {
            let out = batch_gradient(&net, &examples, &settings, false).unwrap();
            opt.step(&mut net, &out.gradient, 0.01);
        }
        let (after, _) = mean_cost(&net, &examples, &relax).unwrap();
        eprintln!("{method:?} {output:?}: XOR loss {before:.4} → {after:.4}");
        assert!(after < 0.05, "{method:?} {output:?}: {before} → {after}");
    }
}

#[test]
fn agreement_is_reported_for_ep_only() {
    let (net, x, t) = tiny(Output::Readout);
    let batch = [Example { input: x, target: t }];
    let relax = Relax { eta: 0.5, max_steps: 5000, tol: 1e-12 };
    let mut settings = Settings { method: Method::Ep, beta: 0.001, free: relax, nudged: relax, cg: CG };
    let a = batch_gradient(&net, &batch, &settings, true).unwrap().agreement.unwrap();
    assert!(a.cosine > 0.999 && (a.norm_ratio - 1.0).abs() < 0.01, "{a:?}");
    settings.method = Method::Backprop;
    assert!(batch_gradient(&net, &batch, &settings, true).unwrap().agreement.is_none());
    assert!(Method::parse("hebbian").unwrap_err().to_string().contains("ep, ep-symmetric, backprop"));
}
