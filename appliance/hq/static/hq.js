// Self-refresh: every 2 s fetch this page's <main> again (?part=main) and swap it in when it changed.
(function () {
  var main = document.querySelector("main");
  if (!main || !main.dataset.refresh) return;
  var url = main.dataset.refresh;
  function tick() {
    fetch(url, {credentials: "same-origin", cache: "no-store"}).then(function (r) {
      return r.ok ? r.text() : null;
    }).then(function (html) {
      if (html !== null && html !== main.innerHTML) main.innerHTML = html;
    }).catch(function () {}).then(function () { setTimeout(tick, 2000); });
  }
  setTimeout(tick, 2000);
})();
