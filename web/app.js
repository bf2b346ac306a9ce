"use strict";
// The demo client: get a session id, follow it with EventSource, list every event, close the
// source on "finish". API URLs are relative to the page, so the page works wherever the service
// serves it (also behind a path prefix); a server URL, typed or given as ?server=, is used instead
// when the page comes from another origin. Text is only ever set with textContent.
//
// With ?token=1 the page shows the token flow: it asks the service's demo endpoint (embedded
// mode only; a real page would ask its own backend) for a short-lived subscriber token, passes
// it as access_token, and when the stream ends with an "unauthorized" event it gets a fresh
// token and opens a new EventSource that resumes after the last event it received.
(function () {
  const SESSION_ID = /^[A-Za-z0-9_-]{1,64}$/;

  const form = document.getElementById("session-form");
  const startButton = document.getElementById("start");
  const serverInput = document.getElementById("server");
  const sessionOutput = document.getElementById("session-id");
  const statusLine = document.getElementById("status");
  const secondViewer = document.getElementById("second-viewer");
  const list = document.getElementById("events");
  const counter = document.getElementById("event-count");
  const tokenFacts = document.getElementById("token-facts");
  const tokenState = document.getElementById("token-state");

  const params = new URLSearchParams(window.location.search);
  const tokenMode = params.get("token") === "1";
  // The demo token's lifetime in seconds: short, so that it runs out during a run.
  const tokenTtl = /^[0-9]{1,4}$/.test(params.get("ttl") || "") ? params.get("ttl") : "3";

  let source = null;
  let received = 0;
  let lastId = "";
  let refreshes = 0;
  // Bumped whenever the page stops following a session, so late answers are ignored.
  let generation = 0;

  function setStatus(state, text) {
    statusLine.dataset.state = state;
    statusLine.textContent = text;
  }

  // An API path resolved against the server URL if one is set, else left relative to the page.
  function apiUrl(path) {
    const server = serverInput.value.trim();
    if (server === "") {
      return path;
    }
    let base;
    try {
      base = new URL(server, document.baseURI);
    } catch (error) {
      throw new Error("the server URL is not a valid URL");
    }
    if (base.protocol !== "http:" && base.protocol !== "https:") {
      throw new Error("the server URL must start with http:// or https://");
    }
    if (!base.pathname.endsWith("/")) {
      base.pathname += "/";
    }
    return new URL(path, base).href;
  }

  function stop() {
    generation += 1;
    if (source !== null) {
      source.close();
      source = null;
    }
  }

  function clearEvents() {
    list.replaceChildren();
    received = 0;
    counter.textContent = "(0)";
  }

  function addEvent(id, name, data) {
    const item = document.createElement("li");
    item.className = "event event-" + name;
    item.dataset.id = id;
    item.dataset.name = name;

    const meta = document.createElement("p");
    meta.className = "event-meta";
    const nameTag = document.createElement("span");
    nameTag.className = "event-name";
    nameTag.textContent = name;
    const idLabel = document.createElement("span");
    idLabel.className = "event-id-label";
    idLabel.textContent = "id";
    const idText = document.createElement("code");
    idText.className = "event-id";
    idText.textContent = id === "" ? "none" : id;
    meta.append(nameTag, " ", idLabel, " ", idText);

    const body = document.createElement("p");
    body.className = "event-data";
    body.textContent = data;

    item.append(meta, body);
    list.append(item);
    received += 1;
    counter.textContent = "(" + received + ")";
  }

  // A link to this same page that follows `sessionId` instead of asking for a new one.
  function showSecondViewer(sessionId) {
    const url = new URL(window.location.href);
    url.hash = "";
    url.search = "";
    url.searchParams.set("session", sessionId);
    const server = serverInput.value.trim();
    if (server !== "") {
      url.searchParams.set("server", server);
    }
    if (tokenMode) {
      url.searchParams.set("token", "1");
      url.searchParams.set("ttl", tokenTtl);
    }
    secondViewer.href = url.href;
    secondViewer.hidden = false;
  }

  function follow(sessionId) {
    stop();
    clearEvents();
    lastId = "";
    refreshes = 0;
    if (!SESSION_ID.test(sessionId)) {
      setStatus("error", "error: the session id must be 1-64 letters, digits, '_' or '-'");
      return;
    }
    sessionOutput.textContent = sessionId;
    showSecondViewer(sessionId);
    if (tokenMode) {
      authorizeAndOpen(sessionId, "getting a token…");
    } else {
      open(sessionId, null);
    }
  }

  // Get a fresh token, then open the stream with it (resuming after lastId, if any).
  async function authorizeAndOpen(sessionId, why) {
    const mine = generation;
    setStatus("authorizing", why);
    let minted;
    try {
      minted = await requestToken(sessionId);
    } catch (error) {
      if (mine === generation) {
        setStatus("error", "error: " + error.message);
      }
      return;
    }
    if (mine !== generation) {
      return;
    }
    showToken(minted);
    open(sessionId, minted.token);
  }

  function showToken(minted) {
    tokenFacts.hidden = false;
    if (minted.subscribeAuth !== "token") {
      tokenState.textContent =
        "this server does not check subscriber tokens (subscribe_auth = open); " +
        "start it with SSE_SUBSCRIBE_AUTH=token";
      return;
    }
    const until = new Date((minted.expiresAt + minted.leewayS) * 1000);
    tokenState.textContent =
      "valid until " + until.toLocaleTimeString() + "; renewed " + refreshes +
      (refreshes === 1 ? " time" : " times");
  }

  function open(sessionId, token) {
    let url;
    try {
      let path = "sse/connect?sessionId=" + encodeURIComponent(sessionId);
      if (token !== null) {
        path += "&access_token=" + encodeURIComponent(token);
      }
      if (lastId !== "") {
        // A new EventSource cannot send Last-Event-ID itself: the query parameter says it.
        path += "&lastEventId=" + encodeURIComponent(lastId);
      }
      url = apiUrl(path);
    } catch (error) {
      setStatus("error", "error: " + error.message);
      return;
    }
    setStatus("connecting", "connecting…");
    const es = new EventSource(url);
    source = es;
    let attempts = 0;

    es.onopen = function () {
      attempts = 0;
      setStatus("open", "open: receiving events");
    };
    es.onmessage = function (event) {
      lastId = event.lastEventId;
      addEvent(event.lastEventId, "message", event.data);
    };
    // Sent instead of events that a resuming connection can no longer get back.
    es.addEventListener("gap", function (event) {
      addEvent("", "gap", "events after " + event.data + " were lost before this reconnect");
    });
    // The token ran out: this source would only be refused (204) if it reconnected.
    es.addEventListener("unauthorized", function () {
      es.close();
      if (source !== es) {
        return;
      }
      source = null;
      refreshes += 1;
      authorizeAndOpen(sessionId, "token expired: getting a fresh one to resume…");
    });
    // As in the original demo: the last event closes the source, so the browser does not
    // reconnect when the server ends the response.
    es.addEventListener("finish", function (event) {
      lastId = event.lastEventId;
      addEvent(event.lastEventId, "finish", event.data);
      es.close();
      if (source === es) {
        source = null;
      }
      setStatus("finished", "finished: " + received + " events received, connection closed");
    });
    es.onerror = function () {
      if (source !== es) {
        return;
      }
      if (es.readyState === EventSource.CONNECTING) {
        attempts += 1;
        setStatus("reconnecting", "reconnecting (attempt " + attempts + ")…");
      } else {
        source = null;
        setStatus("error", "error: the server refused or ended the stream; not retrying");
      }
    };
  }

  function describeFailure(status, text) {
    try {
      const body = JSON.parse(text);
      if (body && typeof body.detail === "string") {
        return "the server answered " + status + ": " + body.detail;
      }
    } catch (ignored) {
      // Not the service's JSON error shape; fall through to the bare status.
    }
    return "the server answered " + status;
  }

  async function requestSessionId() {
    const url = apiUrl("sse/getSessionId");
    let response;
    try {
      response = await fetch(url, { cache: "no-store" });
    } catch (error) {
      throw new Error(
        "could not reach the server; if this page was opened from a file or another site, " +
          "set the server URL"
      );
    }
    const text = (await response.text()).trim();
    if (!response.ok) {
      throw new Error(describeFailure(response.status, text));
    }
    return text;
  }

  async function requestToken(sessionId) {
    const url = apiUrl(
      "dev/token?sessionId=" + encodeURIComponent(sessionId) + "&ttlS=" + tokenTtl
    );
    let response;
    try {
      response = await fetch(url, { method: "POST", cache: "no-store" });
    } catch (error) {
      throw new Error("could not reach the server for a token");
    }
    const text = await response.text();
    if (response.status === 404) {
      throw new Error("no demo token endpoint: it exists only when the service runs embedded");
    }
    if (!response.ok) {
      throw new Error(describeFailure(response.status, text));
    }
    return JSON.parse(text);
  }

  form.addEventListener("submit", async function (event) {
    event.preventDefault();
    stop();
    startButton.disabled = true;
    setStatus("requesting", "requesting a session id…");
    try {
      follow(await requestSessionId());
    } catch (error) {
      setStatus("error", "error: " + error.message);
    } finally {
      startButton.disabled = false;
    }
  });

  if (!("EventSource" in window)) {
    startButton.disabled = true;
    setStatus("error", "error: this browser does not support EventSource");
    return;
  }

  const server = params.get("server");
  if (server !== null) {
    serverInput.value = server;
  }
  const session = params.get("session");
  if (session !== null) {
    follow(session);
  }
})();
