//! The report page: one static, self-contained HTML file. Images are data
//! URIs; a Content-Security-Policy forbids any network access; the page is
//! complete without JavaScript (every overlay is drawn, each segment is a
//! labelled checkbox driven by CSS `:has()`), and the small script only
//! adds report-wide "show / hide all" toggles per segment type.

use std::fmt::Write as _;

use base64::Engine as _;

use super::{Card, CardBody, JobView, Summary};

/// Escape text for HTML element content and quoted attribute values.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            _ => out.push(c),
        }
    }
    out
}

fn data_uri(mime: &str, bytes: &[u8]) -> String {
    format!(
        "data:{mime};base64,{}",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    )
}

/// Colour of a segment type's overlay. The four Kling types have fixed,
/// distinguishable colours; any other type gets one from its name.
pub fn colour(kind: &str) -> [u8; 3] {
    match kind {
        "object_seg" => [31, 119, 180],
        "head_seg" => [255, 127, 14],
        "face_seg" => [214, 39, 40],
        "cloth_seg" => [44, 160, 44],
        other => {
            let h = other.bytes().fold(2166136261u32, |h, b| {
                (h ^ u32::from(b)).wrapping_mul(16777619)
            });
            [
                (h >> 16) as u8 | 0x40,
                (h >> 8) as u8 | 0x40,
                h as u8 | 0x40,
            ]
        }
    }
}

fn hex([r, g, b]: [u8; 3]) -> String {
    format!("#{r:02x}{g:02x}{b:02x}")
}

const STYLE: &str = r#"
:root { font-family: system-ui, sans-serif; color: #1b1b1b; background: #f4f4f2; }
body { margin: 0; }
header { background: #fff; border-bottom: 1px solid #ddd; padding: 1rem 1.5rem; }
h1 { font-size: 1.3rem; margin: 0 0 .5rem; }
.summary { display: flex; flex-wrap: wrap; gap: .5rem 2rem; margin: 0; }
.summary div { min-width: 8rem; }
.summary dt { font-size: .75rem; text-transform: uppercase; color: #555; }
.summary dd { margin: 0; font-size: 1.1rem; font-weight: 600; }
#toolbar { margin-top: .75rem; display: flex; flex-wrap: wrap; gap: .5rem; }
#toolbar button { font: inherit; padding: .2rem .6rem; border: 1px solid #888; border-radius: 4px; background: #fff; cursor: pointer; }
#toolbar button:focus-visible, .toggles input:focus-visible { outline: 3px solid #1f77b4; outline-offset: 2px; }
main { display: grid; grid-template-columns: repeat(auto-fill, minmax(280px, 1fr)); gap: 1rem; padding: 1rem 1.5rem; }
.card { background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: .75rem; }
.card h2 { font-size: .95rem; margin: 0 0 .5rem; overflow-wrap: anywhere; }
.card.failed { border-color: #d62728; }
.stack { position: relative; display: inline-block; line-height: 0; background: repeating-conic-gradient(#eee 0 25%, #fff 0 50%) 0 0 / 16px 16px; }
.stack img { display: block; max-width: 100%; height: auto; }
.stack img.ov { position: absolute; inset: 0; width: 100%; height: 100%; image-rendering: pixelated; }
.toggles { border: 0; padding: 0; margin: .5rem 0; display: flex; flex-wrap: wrap; gap: .25rem .75rem; }
.toggles legend { font-size: .75rem; color: #555; padding: 0; }
.toggles label { font-size: .85rem; cursor: pointer; }
.swatch { display: inline-block; width: .8em; height: .8em; border-radius: 2px; vertical-align: -.05em; margin-right: .2em; }
.absent { font-size: .85rem; color: #666; }
.meta { font-size: .8rem; margin: 0; display: grid; grid-template-columns: max-content 1fr; gap: .1rem .6rem; }
.meta dt { color: #555; }
.meta dd { margin: 0; overflow-wrap: anywhere; }
.problem { color: #a40000; font-size: .85rem; }
progress { width: 100%; }
"#;

const SCRIPT: &str = r#"
(function () {
  var bar = document.getElementById('toolbar');
  if (!bar) return;
  var kinds = JSON.parse(bar.getAttribute('data-kinds') || '[]');
  kinds.forEach(function (kind) {
    [true, false].forEach(function (on) {
      var b = document.createElement('button');
      b.type = 'button';
      b.textContent = (on ? 'Show all ' : 'Hide all ') + kind;
      b.addEventListener('click', function () {
        document.querySelectorAll('input[data-kind="' + kind + '"]').forEach(function (box) {
          box.checked = on;
        });
      });
      bar.appendChild(b);
    });
  });
  bar.hidden = kinds.length === 0;
})();
"#;

/// The whole page.
pub fn page(summary: &Summary, cards: &[Card]) -> String {
    let mut h = String::with_capacity(64 * 1024 + cards.len() * 16 * 1024);
    let title = format!("kling-archiver report: {}", summary.archive);
    let _ = write!(
        h,
        r#"<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'">
<title>{title}</title>
<style>{STYLE}"#,
        title = esc(&title)
    );
    // Per-card toggles: a segment's overlay shows while its box is ticked.
    for kind in &summary.kinds {
        let k = esc(kind);
        let _ = writeln!(
            h,
            ".card:has(input[data-kind=\"{k}\"]:not(:checked)) img.ov[data-kind=\"{k}\"] {{ display: none; }}"
        );
    }
    let _ = write!(
        h,
        "</style>\n</head>\n<body>\n<header>\n<h1>{}</h1>\n",
        esc(&title)
    );
    summary_header(&mut h, summary);
    let kinds_json = serde_json::to_string(&summary.kinds).unwrap_or_else(|_| "[]".into());
    let _ = writeln!(
        h,
        "<div id=\"toolbar\" role=\"toolbar\" aria-label=\"Overlays in every job\" data-kinds=\"{}\" hidden></div>\n</header>\n<main>",
        esc(&kinds_json)
    );
    for card in cards {
        job_card(&mut h, card);
    }
    let _ = write!(h, "</main>\n<script>{SCRIPT}</script>\n</body>\n</html>\n");
    h
}

fn summary_header(h: &mut String, s: &Summary) {
    let range = match (&s.first, &s.last) {
        (Some(a), Some(b)) if a == b => esc(&super::readable_time(a)),
        (Some(a), Some(b)) => format!(
            "{} – {}",
            esc(&super::readable_time(a)),
            esc(&super::readable_time(b))
        ),
        _ => "–".into(),
    };
    let mut outcomes: Vec<String> = s
        .outcomes
        .iter()
        .map(|(k, n)| format!("{n} {}", esc(k)))
        .collect();
    if outcomes.is_empty() {
        outcomes.push("none".into());
    }
    let _ = write!(
        h,
        "<dl class=\"summary\">\
         <div><dt>Jobs</dt><dd>{jobs}</dd></div>\
         <div><dt>By outcome</dt><dd>{outcomes}</dd></div>\
         <div><dt>Total cost</dt><dd>{cost}</dd></div>\
         <div><dt>Archived</dt><dd>{range}</dd></div>\
         <div><dt>Segments found</dt><dd>{found} of {segs}</dd></div>",
        jobs = s.jobs,
        outcomes = outcomes.join(", "),
        cost = esc(&super::units(&format_units(s.cost))),
        found = s.segments_found,
        segs = s.segments,
    );
    if s.jobs_not_shown > 0 {
        let _ = write!(
            h,
            "<div><dt>Not shown</dt><dd>{} older (--limit)</dd></div>",
            s.jobs_not_shown
        );
    }
    h.push_str("</dl>\n");
}

/// Units as Kling writes them: no trailing zeros.
pub fn format_units(units: f64) -> String {
    let s = format!("{units:.3}");
    s.trim_end_matches('0').trim_end_matches('.').to_owned()
}

fn job_card(h: &mut String, card: &Card) {
    let failed = matches!(card.body, CardBody::Failed { .. }) || !card.problems.is_empty();
    let _ = write!(
        h,
        "<article class=\"card{}\" data-job-id=\"{id}\" aria-labelledby=\"t-{n}\">\n<h2 id=\"t-{n}\">{id}</h2>\n",
        if failed { " failed" } else { "" },
        id = esc(&card.job_id),
        n = card.index,
    );
    match &card.body {
        CardBody::Failed { code, reason } => {
            let _ = writeln!(
                h,
                "<p class=\"problem\">Dead-lettered <code>{}</code>: {}</p>",
                esc(code),
                esc(reason)
            );
        }
        CardBody::Archived(job) => {
            picture(h, &card.job_id, job);
            facts(h, job);
        }
    }
    for p in &card.problems {
        let _ = writeln!(h, "<p class=\"problem\">{}</p>", esc(p));
    }
    h.push_str("</article>\n");
}

/// The source thumbnail with its mask overlays stacked on it, and a
/// toggle per segment type shown.
fn picture(h: &mut String, job_id: &str, job: &JobView) {
    if let Some(thumb) = &job.thumb {
        let _ = write!(
            h,
            "<div class=\"stack\"><img src=\"{}\" width=\"{}\" height=\"{}\" alt=\"Source image of job {}\">",
            data_uri("image/jpeg", &thumb.jpeg),
            thumb.width,
            thumb.height,
            esc(job_id)
        );
        for seg in &job.segments {
            if let Some(png) = &seg.overlay {
                let _ = write!(
                    h,
                    "<img class=\"ov\" data-kind=\"{k}\" src=\"{}\" alt=\"{k} mask, {:.0}% of the image\">",
                    data_uri("image/png", png),
                    seg.coverage * 100.0,
                    k = esc(&seg.kind),
                );
            }
        }
        h.push_str("</div>\n");
    }
    let shown: Vec<_> = job
        .segments
        .iter()
        .filter(|s| s.overlay.is_some())
        .collect();
    if !shown.is_empty() {
        h.push_str("<fieldset class=\"toggles\"><legend>Show segment</legend>");
        for seg in shown {
            let _ = write!(
                h,
                "<label><input type=\"checkbox\" checked data-kind=\"{k}\"><span class=\"swatch\" style=\"background:{c}\"></span>{k}</label>",
                k = esc(&seg.kind),
                c = hex(colour(&seg.kind)),
            );
        }
        h.push_str("</fieldset>\n");
    }
}

/// Segments not found, then the job's facts: labels, source, what was
/// sent, transforms, cost, request id, when.
fn facts(h: &mut String, job: &JobView) {
    let absent: Vec<String> = job
        .segments
        .iter()
        .filter(|s| !s.found)
        .map(|s| format!("{}: not found", esc(&s.kind)))
        .collect();
    if !absent.is_empty() {
        let _ = writeln!(h, "<p class=\"absent\">{}</p>", absent.join(" · "));
    }
    let labels = job
        .labels
        .iter()
        .map(|(k, v)| format!("{}={}", esc(k), esc(v)))
        .collect::<Vec<_>>()
        .join(", ");
    let _ = writeln!(
        h,
        "<dl class=\"meta\">\
         <dt>Labels</dt><dd>{labels}</dd>\
         <dt>Source</dt><dd>{source}</dd>\
         <dt>Sent</dt><dd>{sent}</dd>\
         <dt>Transforms</dt><dd>{transforms}</dd>\
         <dt>Cost</dt><dd>{cost}</dd>\
         <dt>Request</dt><dd><code>{request}</code></dd>\
         <dt>Archived</dt><dd>{at}</dd>\
         </dl>",
        labels = if labels.is_empty() {
            "–".into()
        } else {
            labels
        },
        source = esc(&job.source),
        sent = esc(&job.sent),
        transforms = esc(&job.transforms),
        cost = esc(&job.cost),
        request = esc(&job.request_id),
        at = esc(&job.archived_at_shown),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_everything_that_could_break_out() {
        assert_eq!(
            esc(r#"<script>"x" & 'y'</script>"#),
            "&lt;script&gt;&quot;x&quot; &amp; &#39;y&#39;&lt;/script&gt;"
        );
    }

    #[test]
    fn units_lose_trailing_zeros() {
        assert_eq!(format_units(3.0), "3");
        assert_eq!(format_units(2.5), "2.5");
        assert_eq!(format_units(0.125), "0.125");
    }

    #[test]
    fn unknown_kinds_get_a_stable_visible_colour() {
        assert_eq!(colour("hat_seg"), colour("hat_seg"));
        assert_ne!(colour("hat_seg"), colour("shoe_seg"));
        assert!(colour("x").iter().all(|&c| c >= 0x40));
    }
}
