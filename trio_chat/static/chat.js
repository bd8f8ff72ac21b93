// The trio-chat page: speaks the chat protocol over a WebSocket to the server that served it.
//
// Every WebSocket message from the server is exactly one reply or broadcast (JOINED_CHATROOM,
// LEFT_CHATROOM, CHAT, ERROR_CODE, HELO); every request goes out as one message. The page keeps
// a log per room and shows the current room's in #log, one line "NAME: TEXT" per message.
"use strict";

(() => {
  const MAX_LINES = 2000; // lines kept per room; older ones are dropped
  const $ = (id) => document.getElementById(id);

  const state = {
    name: "",
    rooms: new Map(), // room name -> room
    byRef: new Map(), // ROOM_REF -> room
    current: null, // the room shown
    wanted: null, // the room the user last asked to join: shown once joined
    joining: [], // rooms whose JOIN awaits its reply, oldest first
    socket: null,
  };

  // A room the page is in (or was in before the connection was lost).
  function makeRoom(name) {
    const room = { name, ref: null, joinId: null, joined: false, lines: [], unread: 0, tab: null };
    state.rooms.set(name, room);
    return room;
  }

  // -- the protocol -----------------------------------------------------------------------------

  const oneLine = (text) => text.replace(/[\r\n]+/g, " ").trim();

  function send(text) {
    if (state.socket && state.socket.readyState === WebSocket.OPEN) {
      state.socket.send(text);
      return true;
    }
    return false;
  }

  function requestJoin(room) {
    if (send(`JOIN_CHATROOM: ${room.name}\nCLIENT_IP: 0\nPORT: 0\nCLIENT_NAME: ${state.name}\n`)) {
      state.joining.push(room);
    }
  }

  const requestLeave = (room) =>
    send(`LEAVE_CHATROOM: ${room.ref}\nJOIN_ID: ${room.joinId}\nCLIENT_NAME: ${state.name}\n`);

  const requestChat = (room, text) =>
    send(`CHAT: ${room.ref}\nJOIN_ID: ${room.joinId}\nCLIENT_NAME: ${state.name}\nMESSAGE: ${text}\n\n`);

  // One reply or broadcast: its first line's keyword and value, and its fields.
  function parse(data) {
    const fields = new Map();
    let body = data;
    const message = data.indexOf("\nMESSAGE: ");
    if (message >= 0) {
      // A CHAT's text runs to the blank line that ends it and may itself span lines.
      fields.set("MESSAGE", data.slice(message + 10).replace(/\n\n$/, ""));
      body = data.slice(0, message);
    }
    const lines = body.split("\n");
    for (const line of lines.slice(1)) {
      const colon = line.indexOf(":");
      if (colon > 0) fields.set(line.slice(0, colon).trim(), line.slice(colon + 1).trim());
    }
    const first = lines[0];
    const colon = first.indexOf(":");
    const kind = colon > 0 ? first.slice(0, colon) : first.split(" ")[0];
    const value = colon > 0 ? first.slice(colon + 1).trim() : "";
    return { kind, value, fields };
  }

  function received(data) {
    const { kind, value, fields } = parse(data);
    if (kind === "JOINED_CHATROOM") {
      const room = state.rooms.get(value) || makeRoom(value);
      state.joining = state.joining.filter((waiting) => waiting !== room);
      if (room.ref !== null) state.byRef.delete(room.ref);
      room.ref = fields.get("ROOM_REF");
      room.joinId = fields.get("JOIN_ID");
      room.joined = true;
      state.byRef.set(room.ref, room);
      if (state.current === null || room === state.wanted) show(room);
      if (room === state.wanted) state.wanted = null;
      render();
    } else if (kind === "LEFT_CHATROOM") {
      const room = state.byRef.get(value);
      if (room) forget(room);
    } else if (kind === "CHAT") {
      const room = state.byRef.get(value);
      if (room && room.joined) addLine(room, fields.get("CLIENT_NAME") || "", fields.get("MESSAGE") || "");
    } else if (kind === "ERROR_CODE") {
      const text = `error ${value}: ${fields.get("ERROR_DESCRIPTION") || "no description"}`;
      // Replies come in request order, and a JOIN fails with these codes: the error is the
      // answer to the oldest JOIN still waiting, whose room is then dropped.
      const failed = ["1", "5", "6"].includes(value) ? state.joining.shift() : undefined;
      if (failed && !failed.joined) {
        banner(`Could not join ${failed.name}: the server says ${text}`, false);
        forget(failed);
      } else {
        banner(`The server says ${text}`, false);
      }
      if (state.current) addNote(state.current, text, "error");
    }
    // HELO replies and anything unknown are not the page's business.
  }

  // -- the connection ---------------------------------------------------------------------------

  function connect() {
    if (state.socket) state.socket.close(); // a reconnect while still connecting: start afresh
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    const socket = new WebSocket(`${scheme}//${location.host}/ws`);
    let opened = false;
    state.socket = socket;
    status("connecting");
    socket.addEventListener("open", () => {
      if (state.socket !== socket) return;
      opened = true;
      status("connected");
      hideBanner();
      for (const room of state.rooms.values()) requestJoin(room);
      render();
    });
    socket.addEventListener("message", (event) => {
      if (state.socket === socket && typeof event.data === "string") received(event.data);
    });
    socket.addEventListener("close", (event) => {
      if (state.socket !== socket) return;
      state.socket = null;
      state.joining = [];
      for (const room of state.rooms.values()) room.joined = false;
      const why = event.code === 1000 || event.code === 1001 || event.code === 1006
        ? "" : ` (${event.code}${event.reason ? " " + event.reason : ""})`;
      status("disconnected");
      if (opened) {
        banner(`Connection to the server lost${why}.`, true);
        for (const room of state.rooms.values()) addNote(room, `connection lost${why}`, "error");
      } else {
        banner("Could not connect to the server.", true);
      }
      render();
    });
  }

  // -- what the user does -----------------------------------------------------------------------

  function join(name) {
    name = oneLine(name);
    if (!name) return;
    const existing = state.rooms.get(name);
    if (existing && existing.joined) {
      show(existing);
      render();
      return;
    }
    const room = existing || makeRoom(name);
    state.wanted = room;
    if (state.current === null) show(room);
    requestJoin(room);
    render();
  }

  function leave(room) {
    if (room.joined) requestLeave(room);
    else forget(room); // not joined (connection lost): nothing to tell the server
  }

  function forget(room) {
    state.rooms.delete(room.name);
    if (room.ref !== null) state.byRef.delete(room.ref);
    if (state.current === room) {
      const next = state.rooms.values().next();
      state.current = null;
      if (!next.done) show(next.value);
    }
    render();
  }

  // -- drawing ----------------------------------------------------------------------------------

  function addLine(room, who, text) {
    const announcement = text === `${who} has joined this chatroom.` || text === `${who} has left this chatroom.`;
    const kind = announcement ? "notice" : who === state.name ? "mine" : "";
    push(room, { who, text, kind });
  }

  function addNote(room, text, kind) {
    push(room, { who: null, text, kind });
  }

  function push(room, line) {
    room.lines.push(line);
    if (room.lines.length > MAX_LINES) room.lines.splice(0, room.lines.length - MAX_LINES);
    if (room === state.current) {
      const log = $("log");
      const atBottom = log.scrollHeight - log.scrollTop - log.clientHeight < 40;
      log.append(lineElement(line));
      while (log.childElementCount > MAX_LINES) log.firstElementChild.remove();
      if (atBottom) log.scrollTop = log.scrollHeight;
    } else {
      room.unread += 1;
      renderTabs();
    }
  }

  function lineElement(line) {
    const element = document.createElement("div");
    element.className = `line ${line.kind}`.trim();
    if (line.who === null) {
      element.textContent = line.text;
      return element;
    }
    const who = document.createElement("span");
    who.className = "name";
    who.textContent = line.who;
    const text = document.createElement("span");
    text.className = "text";
    text.textContent = line.text;
    element.append(who, ": ", text);
    return element;
  }

  function show(room) {
    state.current = room;
    room.unread = 0;
    const log = $("log");
    log.replaceChildren(...room.lines.map(lineElement));
    log.scrollTop = log.scrollHeight;
    const url = new URL(location.href);
    url.searchParams.set("name", state.name);
    url.searchParams.set("room", room.name);
    history.replaceState(null, "", url);
    document.title = `${room.name} - trio-chat`;
  }

  function renderTabs() {
    const list = $("rooms");
    list.replaceChildren();
    for (const room of state.rooms.values()) {
      const item = document.createElement("li");
      const button = document.createElement("button");
      button.type = "button";
      button.className = "tab";
      if (room === state.current) button.setAttribute("aria-current", "true");
      if (!room.joined) button.classList.add("pending");
      const name = document.createElement("span");
      name.className = "tab-name";
      name.textContent = room.name;
      button.title = room.name;
      button.append(name);
      if (room.unread) {
        const badge = document.createElement("span");
        badge.className = "unread";
        badge.textContent = String(room.unread);
        button.append(badge);
      }
      button.addEventListener("click", () => {
        show(room);
        render();
        $("message").focus();
      });
      item.append(button);
      list.append(item);
    }
  }

  function render() {
    renderTabs();
    const room = state.current;
    const usable = Boolean(room && room.joined && state.socket);
    $("room-title").textContent = room ? room.name : "no room: join one";
    if (!room) $("log").replaceChildren();
    $("message").disabled = !usable;
    $("send-button").disabled = !usable;
    $("leave").disabled = !room;
  }

  function status(text) {
    const element = $("status");
    element.textContent = text;
    element.dataset.state = text;
  }

  function banner(text, offerReconnect) {
    $("banner-text").textContent = text;
    $("reconnect").hidden = !offerReconnect;
    $("banner").hidden = false;
    $("banner").classList.toggle("lost", offerReconnect);
  }

  function hideBanner() {
    $("banner").hidden = true;
  }

  // -- start ------------------------------------------------------------------------------------

  function start(name, room) {
    state.name = oneLine(name);
    $("who").textContent = state.name;
    $("login").hidden = true;
    $("chat").hidden = false;
    join(room);
    connect();
    $("message").focus();
  }

  $("send").addEventListener("submit", (event) => {
    event.preventDefault();
    const input = $("message");
    const text = oneLine(input.value);
    const room = state.current;
    if (!text || !room || !room.joined) return;
    if (requestChat(room, text)) input.value = "";
  });

  $("join").addEventListener("submit", (event) => {
    event.preventDefault();
    join($("join-room").value);
    $("join-room").value = "";
  });

  $("leave").addEventListener("click", () => {
    if (state.current) leave(state.current);
  });

  $("reconnect").addEventListener("click", () => connect());
  $("dismiss").addEventListener("click", hideBanner);

  $("login").addEventListener("submit", (event) => {
    event.preventDefault();
    const name = oneLine($("login-name").value);
    const room = oneLine($("login-room").value);
    if (name && room) start(name, room);
  });

  const params = new URLSearchParams(location.search);
  const name = oneLine(params.get("name") || "");
  const room = oneLine(params.get("room") || "");
  if (name && room) {
    start(name, room);
  } else {
    $("login-name").value = name;
    $("login-room").value = room;
    $("login").hidden = false;
    status("not connected");
    (name ? $("login-room") : $("login-name")).focus();
  }
})();
