// The session inspector's only script (no inline scripts: the pages' CSP forbids them).
// - Lease countdowns tick every second.
// - A session page follows its change feed (/ui/changes/{id}, an EventSource):
//   each event re-reads the live panel; `reset` reloads the page. Where the feed answers
//   anything but a stream (404 on a service without one), the page polls the panel every
//   few seconds with If-None-Match and re-renders only when the ETag changes.
(function () {
  "use strict";
  var POLL_MS = 3000;
  var EVENTS = ["patched", "appended", "joined", "left", "lapsed", "suspended", "resumed",
                "archived", "deleted"];

  function tick() {
    var now = Date.now();
    document.querySelectorAll(".countdown[data-expires]").forEach(function (el) {
      var left = Math.round((Date.parse(el.dataset.expires) - now) / 1000);
      el.textContent = left > 0 ? "expires in " + left + " s" : "expired";
      el.classList.toggle("expired", left <= 0);
    });
  }

  function follow(live) {
    var id = live.dataset.session;
    var panelUrl = "/ui/sessions/" + id + "/panel";
    var status = document.getElementById("live-status");
    var busy = false;
    var again = false;

    function say(text) { if (status) { status.textContent = text; } }

    function refresh() {
      if (busy) { again = true; return; }
      busy = true;
      fetch(panelUrl, { headers: { "If-None-Match": live.dataset.etag || "" },
                        credentials: "same-origin", cache: "no-store" })
        .then(function (r) {
          if (r.status === 304) { return null; }
          if (r.status === 401) { window.location.assign("/ui/sign-in"); return null; }
          if (r.status === 404) { say("this session no longer exists"); return null; }
          if (!r.ok) { throw new Error("HTTP " + r.status); }
          live.dataset.etag = r.headers.get("ETag") || "";
          return r.text();
        })
        .then(function (html) {
          if (html !== null && html !== undefined) {
            live.innerHTML = html;
            if (window.htmx) { window.htmx.process(live); }
            tick();
          }
        })
        .catch(function (err) { say("update failed (" + err.message + "); retrying"); })
        .finally(function () {
          busy = false;
          if (again) { again = false; refresh(); }
        });
    }

    function poll() {
      say("polling every " + POLL_MS / 1000 + " s (no change feed here)");
      window.setInterval(refresh, POLL_MS);
    }

    if (!window.EventSource) { poll(); return; }
    var source = new EventSource("/ui/changes/" + id);
    var opened = false;
    source.onopen = function () { opened = true; say("live (change feed)"); };
    EVENTS.forEach(function (name) { source.addEventListener(name, refresh); });
    source.addEventListener("reset", function () { window.location.reload(); });
    source.onerror = function () {
      // CLOSED: the answer was not a stream (404, 401): poll instead. CONNECTING: the
      // browser retries by itself; re-read once so nothing missed meanwhile stays unseen.
      if (source.readyState === EventSource.CLOSED) {
        source.close();
        poll();
      } else if (opened) {
        say("reconnecting to the change feed…");
        refresh();
      }
    };
  }

  document.addEventListener("DOMContentLoaded", function () {
    tick();
    window.setInterval(tick, 1000);
    var live = document.getElementById("live");
    if (live) { follow(live); }
  });
})();
