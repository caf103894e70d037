//! train-ep's parameter mistakes are located and say how to fix them; it trains on WikiText read
//! from the shared folder.

use crate::support::{shared, Sandbox};

fn pipeline(extra: &str) -> String {
    format!(
        "[stages.ep]\nkind = \"train-ep\"\ndata = \"synthetic:facts:train\"\neval_data = \"synthetic:facts:test\"\n{extra}"
    )
}

#[test]
fn train_ep_bad_parameters_are_located_and_explained() {
    let sb = Sandbox::real();
    for (extra, line_col, says) in [
        ("beta = 0.0\n", "5:8", "beta: 0 is not a positive number; it must be > 0"),
        ("hidden = []\n", "5:10", "hidden: an empty list; name at least one hidden layer"),
        ("eval_data = \"synthetic:facts:train\"\n", "4:13", "eval_data: names the training text"),
    ] {
        let text = if extra.starts_with("eval_data") {
            "[stages.ep]\nkind = \"train-ep\"\ndata = \"synthetic:facts:train\"\neval_data = \"synthetic:facts:train\"\n"
                .to_string()
        } else {
            pipeline(extra)
        };
        let p = sb.write("bad.toml", &text);
        let err = sb.run(&["validate", p.to_str().unwrap()]).expect(2).stderr();
        assert!(err.contains(says), "{extra}: {err}");
        assert!(err.contains(&format!("bad.toml:{line_col}")), "{extra}: located: {err}");
    }
    let p = sb.write("big.toml", &pipeline("hidden = [4096, 4096]\ncontext = 64\n"));
    let err = sb.run(&["validate", p.to_str().unwrap()]).expect(2).stderr();
    assert!(err.contains("hidden: the network would have 84943104 parameters"), "{err}");
    let p = sb.write("method.toml", &pipeline("method = \"hebbian\"\n"));
    let err = sb.run(&["validate", p.to_str().unwrap()]).expect(2).stderr();
    assert!(err.contains("hebbian") && err.contains("ep-symmetric") && err.contains("backprop"), "{err}");
}

/// A text shorter than the context fails at run time with the source named.
#[test]
fn train_ep_too_short_a_text_is_explained() {
    let sb = Sandbox::real();
    sb.write("short.txt", "ab");
    let p = sb.write(
        "short.toml",
        "[stages.ep]\nkind = \"train-ep\"\ndata = { path = \"short.txt\", rows = \"file\" }\neval_data = \"synthetic:facts:test\"\ncontext = 3\nsteps = 1\n",
    );
    let err = sb.run(&["run", p.to_str().unwrap()]).expect(1).stderr();
    assert!(err.contains("data:") && err.contains("has 2 bytes, too few for a context of 3"), "{err}");
}

/// WikiText-2 validation → test from ../shared (the same text as the hub names): every method
/// beats the unigram bar after a few hundred steps.
#[test]
fn train_ep_learns_wikitext_bytes() {
    let (Some(valid), Some(test)) =
        (shared("data/wikitext-2-raw/wiki.valid.raw"), shared("data/wikitext-2-raw/wiki.test.raw"))
    else {
        return;
    };
    let sb = Sandbox::real();
    let p = sb.write(
        "wiki.toml",
        &format!(
            "[pipeline]\nname = \"wiki\"\n[defaults.train-ep]\ndata = {{ path = '{}' }}\neval_data = {{ path = '{}' }}\n\
             hidden = [16, 16]\ncontext = 2\nsteps = 200\nbatch = 8\nlr = 0.01\neval_tokens = 500\ncosine_every = 50\n\
             [stages.ep]\nkind = \"train-ep\"\nmethod = \"ep-symmetric\"\n[stages.bp]\nkind = \"train-ep\"\nmethod = \"backprop\"\n",
            valid.display(),
            test.display()
        ),
    );
    sb.run(&["run", p.to_str().unwrap()]).expect(0);
    let s = sb.session("wiki.json");
    for name in ["ep", "bp"] {
        let m = &s["stages"][name]["metrics"];
        let (ppl, unigram) = (m["ppl"].as_f64().unwrap(), m["unigram_ppl"].as_f64().unwrap());
        assert!(ppl < unigram, "{name}: ppl {ppl}, unigram {unigram}");
        assert!(m["data"].as_str().unwrap().ends_with("wiki.valid.raw"));
    }
    assert!(s["stages"]["ep"]["metrics"]["cosine_mean"].as_f64().unwrap() > 0.95);
}
