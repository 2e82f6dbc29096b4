// Times in the browser's own time zone: the server writes UTC into <time datetime>, this rewrites
// the text (also in parts htmx swaps in later).
"use strict";
(function () {
  function localTimes(root) {
    root.querySelectorAll("time[datetime]").forEach(function (el) {
      var at = new Date(el.getAttribute("datetime"));
      if (!isNaN(at)) {
        el.textContent = at.toLocaleString(undefined, {dateStyle: "medium", timeStyle: "short"});
        el.title = el.getAttribute("datetime");
      }
    });
  }
  document.addEventListener("DOMContentLoaded", function () { localTimes(document); });
  document.addEventListener("htmx:afterSettle", function (e) { localTimes(e.target); });
})();

// Filters with a date and time (the audit log's since/until) mean the browser's own zone: this tells
// the server which one (without JavaScript the field stays empty and the server reads UTC).
(function () {
  document.addEventListener("DOMContentLoaded", function () {
    var zone = Intl.DateTimeFormat().resolvedOptions().timeZone;
    document.querySelectorAll("input[data-browser-zone]").forEach(function (el) {
      if (!el.value && zone) { el.value = zone; }
    });
  });
})();

// Jobs: a log line's time to the second, in the browser's zone (after the minutes-only rewrite above).
(function () {
  function clocks(root) {
    root.querySelectorAll("time.clock[datetime]").forEach(function (el) {
      var at = new Date(el.getAttribute("datetime"));
      if (!isNaN(at)) { el.textContent = at.toLocaleTimeString(undefined, {hour12: false}); }
    });
  }
  document.addEventListener("DOMContentLoaded", function () { clocks(document); });
  document.addEventListener("htmx:afterSettle", function (e) { clocks(e.target); });
})();
