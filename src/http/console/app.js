// Live numbers: while a page shows something still running (body
// data-live="1"), fetch the same page every two seconds and swap its main
// part in. The page is rendered by the server either way; without this
// script it is simply static.
(function () {
  "use strict";
  function refresh() {
    if (document.body.dataset.live !== "1") return;
    fetch(location.href, { credentials: "same-origin", headers: { "Accept": "text/html" } })
      .then(function (r) { return r.ok ? r.text() : Promise.reject(r.status); })
      .then(function (text) {
        var next = new DOMParser().parseFromString(text, "text/html");
        var main = next.getElementById("live");
        // Keep what the user is doing: do not replace a form being edited.
        if (main && !document.querySelector("#live :focus")) {
          document.getElementById("live").replaceWith(main);
        }
        document.body.dataset.live = next.body.dataset.live;
      })
      .catch(function () { /* try again at the next tick */ })
      .finally(function () { if (document.body.dataset.live === "1") setTimeout(refresh, 2000); });
  }
  document.addEventListener("DOMContentLoaded", function () { setTimeout(refresh, 2000); });
})();
