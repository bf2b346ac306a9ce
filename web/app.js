"use strict";
// Get a session id, open an EventSource on it, list the events, close on "finish".
(function () {
  const status = document.getElementById("status");
  const list = document.getElementById("events");
  function add(text) {
    const item = document.createElement("li");
    item.textContent = text;
    list.appendChild(item);
  }
  document.getElementById("start").addEventListener("click", async function () {
    const response = await fetch("sse/getSessionId");
    const sessionId = (await response.text()).trim();
    status.textContent = "connecting " + sessionId;
    const source = new EventSource("sse/connect?sessionId=" + encodeURIComponent(sessionId));
    source.onopen = function () { status.textContent = "open"; };
    source.onmessage = function (e) { add(e.lastEventId + " " + e.data); };
    source.addEventListener("finish", function (e) {
      add(e.lastEventId + " finish " + e.data);
      source.close();
      status.textContent = "finished";
    });
    source.onerror = function () {
      status.textContent = source.readyState === EventSource.CLOSED ? "closed" : "reconnecting";
    };
  });
})();
