// hookd console: the one piece of JavaScript, and optional (every page works without it).
// A page whose <body> has data-refresh="N" reloads itself every N seconds while the tab is visible.
(function () {
  "use strict";
  var seconds = Number(document.body.getAttribute("data-refresh"));
  if (!seconds) {
    return;
  }
  setInterval(function () {
    if (!document.hidden) {
      window.location.reload();
    }
  }, seconds * 1000);
}());
