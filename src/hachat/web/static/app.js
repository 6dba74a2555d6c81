// hachat browser client: plain ES2017+, no framework, no build step.
//
// Flow: sign in -> GET /events (no since) for the current cursor -> GET /chats -> GET /messages
// for the open group -> long-poll GET /events?since=<cursor> forever. Messages are kept per group
// in a Map keyed by id, so an id is shown at most once whether it came from history, from the
// event stream or from the answer to our own POST. Every request that fails with a network error
// or a 502/503/504 (e.g. 503 not_active during a failover) is retried against the same origin
// with backoff + jitter while the status bar says "reconnecting…"; the event stream then resumes
// from the cursor it holds in memory. All user text goes through textContent (never innerHTML).
'use strict';

(function () {
  // ------------------------------------------------------------------ constants & state
  const POLL_TIMEOUT_S = 25; // server-side long-poll wait
  const REQUEST_TIMEOUT_MS = 15000; // ordinary requests
  const ACTION_RETRY_MS = 60000; // how long a user action keeps retrying before showing an error
  const BACKOFF_BASE_MS = 200;
  const BACKOFF_CAP_MS = 2000;
  const HEALTH_EVERY_MS = 5000;
  const PAGE_SIZE = 50;
  const RETRY_STATUSES = new Set([502, 503, 504]);
  const KEY = { token: 'hachat.token', userId: 'hachat.userId', username: 'hachat.username', group: 'hachat.group' };

  const state = {
    token: null,
    userId: null,
    username: null,
    cursor: null, // event stream position (kept in memory only)
    groups: new Map(), // id -> {id, name, createdBy, createdAt}
    views: new Map(), // groupId -> {loaded, nextBefore, messages: Map(id -> message), unread}
    deleted: new Set(), // message ids known to be deleted (a late history page must not revive them)
    currentGroupId: null,
    session: 0, // bumped on sign-in / sign-out: stale loops and answers are ignored
    abort: null, // AbortController of the current session
    retrying: 0, // requests currently waiting to retry
    nodeRole: null, // 'active' | 'passive' | null, from the last answer
    nodeName: null, // the `node` field of the last /health answer
  };

  const $ = (id) => document.getElementById(id);

  // ------------------------------------------------------------------ small helpers
  function sleep(ms, signal) {
    return new Promise((resolve, reject) => {
      const timer = setTimeout(resolve, ms);
      if (signal) {
        signal.addEventListener('abort', () => {
          clearTimeout(timer);
          reject(new SessionEnded());
        }, { once: true });
      }
    });
  }

  function backoff(attempt) {
    const ceiling = Math.min(BACKOFF_CAP_MS, BACKOFF_BASE_MS * Math.pow(2, attempt));
    return ceiling / 2 + Math.random() * (ceiling / 2); // jitter: half to full
  }

  function uuid4() {
    if (window.crypto && typeof window.crypto.randomUUID === 'function') return window.crypto.randomUUID();
    const b = window.crypto.getRandomValues(new Uint8Array(16)); // works outside secure contexts too
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    const h = Array.from(b, (x) => x.toString(16).padStart(2, '0')).join('');
    return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
  }

  function el(tag, props, children) {
    const node = document.createElement(tag);
    if (props) {
      for (const [k, v] of Object.entries(props)) {
        if (v === undefined || v === null) continue;
        if (k === 'text') node.textContent = v;
        else if (k === 'className') node.className = v;
        else if (k === 'dataset') Object.assign(node.dataset, v);
        else node.setAttribute(k, v);
      }
    }
    for (const child of children || []) node.appendChild(child);
    return node;
  }

  function show(node, visible) {
    node.hidden = !visible;
  }

  function showText(node, text) {
    node.textContent = text || '';
    node.hidden = !text;
  }

  function formatTime(iso) {
    const d = new Date(iso);
    if (Number.isNaN(d.getTime())) return '';
    const today = new Date();
    const sameDay = d.toDateString() === today.toDateString();
    return sameDay ? d.toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' })
      : d.toLocaleString([], { month: 'short', day: 'numeric', hour: '2-digit', minute: '2-digit' });
  }

  class ApiError extends Error {
    constructor(status, body) {
      super((body && body.message) || (body && body.error) || `HTTP ${status}`);
      this.status = status;
      this.code = (body && body.error) || `http_${status}`;
      this.body = body || {};
    }
  }

  class SessionEnded extends Error {
    constructor() { super('session ended'); }
  }

  // ------------------------------------------------------------------ status bar
  function setStatus(kind, text, activeUrl) {
    const box = $('status');
    box.dataset.state = kind;
    $('status-text').textContent = text;
    const link = $('active-link');
    let href = null;
    if (activeUrl) {
      try {
        const u = new URL(activeUrl, window.location.href);
        if ((u.protocol === 'http:' || u.protocol === 'https:') && u.origin !== window.location.origin) href = u.href;
      } catch (e) { /* not a URL: ignore */ }
    }
    if (href) {
      link.href = href;
      link.textContent = `active node: ${href}`;
    }
    link.hidden = !href;
  }

  function markReachable(role, node) {
    state.nodeRole = role;
    if (node) state.nodeName = node;
    if (state.retrying > 0 && role === 'active') return; // a retry loop still owns the status
    const name = state.nodeName ? ` (${state.nodeName})` : '';
    if (role === 'active') setStatus('active', `connected — active node${name}`);
    else setStatus('passive', `this node is passive${name}; waiting for the active node`);
  }

  function beginRetry(reason, activeUrl) {
    setStatus('reconnecting', `reconnecting… ${reason ? `(${reason})` : ''}`.trim(), activeUrl);
  }

  // ------------------------------------------------------------------ HTTP
  function buildUrl(path, query) {
    const url = new URL(path, document.baseURI); // relative: same origin, works under a prefix
    if (query) {
      for (const [k, v] of Object.entries(query)) {
        if (v !== undefined && v !== null) url.searchParams.set(k, String(v));
      }
    }
    return url.href;
  }

  async function fetchOnce(method, url, body, timeoutMs, sessionSignal, extraHeaders) {
    const ctrl = new AbortController();
    const onSessionAbort = () => ctrl.abort();
    if (sessionSignal) sessionSignal.addEventListener('abort', onSessionAbort, { once: true });
    const timer = setTimeout(() => ctrl.abort(), timeoutMs);
    const headers = { Accept: 'application/json' };
    if (body !== undefined) headers['Content-Type'] = 'application/json';
    if (state.token) headers.Authorization = `Bearer ${state.token}`;
    if (extraHeaders) Object.assign(headers, extraHeaders);
    try {
      const resp = await fetch(url, {
        method,
        headers,
        body: body === undefined ? undefined : JSON.stringify(body),
        signal: ctrl.signal,
        cache: 'no-store',
        credentials: 'same-origin',
      });
      const text = await resp.text();
      let data = {};
      if (text) {
        try { data = JSON.parse(text); } catch (e) { data = { error: `http_${resp.status}`, message: text.slice(0, 200) }; }
      }
      return { status: resp.status, data };
    } finally {
      clearTimeout(timer);
      if (sessionSignal) sessionSignal.removeEventListener('abort', onSessionAbort);
      if (sessionSignal && sessionSignal.aborted) throw new SessionEnded(); // eslint-disable-line no-unsafe-finally
    }
  }

  // One API call, retried (same origin, backoff + jitter) on network errors and 502/503/504.
  // Options: query, body, headers, timeoutMs, retryForMs (Infinity = forever, 0 = no retry).
  async function api(method, path, opts) {
    const o = opts || {};
    const signal = state.abort ? state.abort.signal : null;
    const session = state.session;
    const url = buildUrl(path, o.query);
    const retryFor = o.retryForMs === undefined ? ACTION_RETRY_MS : o.retryForMs;
    const deadline = Date.now() + retryFor;
    let attempt = 0;
    let counted = false;
    try {
      for (;;) {
        let answer = null;
        let reason = '';
        let activeUrl = null;
        try {
          answer = await fetchOnce(method, url, o.body, o.timeoutMs || REQUEST_TIMEOUT_MS, signal, o.headers);
        } catch (e) {
          if (e instanceof SessionEnded || session !== state.session) throw new SessionEnded();
          reason = 'connection lost';
        }
        if (answer) {
          if (answer.status < 400) {
            if (counted) { counted = false; releaseRetry(session); pollHealth(); } // back: which node now?
            if (path !== 'health' && state.token) markReachable('active', null);
            return answer.data;
          }
          if (!RETRY_STATUSES.has(answer.status)) {
            if (answer.status === 401 && state.token && path !== 'login') onUnauthorized();
            throw new ApiError(answer.status, answer.data);
          }
          if (answer.data.error === 'not_active') {
            reason = 'node is passive';
            activeUrl = answer.data.active;
            state.nodeRole = 'passive';
          } else if (answer.data.error === 'database_unavailable') {
            reason = 'database unavailable';
          } else {
            reason = `HTTP ${answer.status}`;
          }
        }
        const delay = backoff(attempt);
        attempt += 1;
        if (Date.now() + delay > deadline) {
          if (answer) throw new ApiError(answer.status, answer.data);
          throw new ApiError(0, { error: 'unreachable', message: 'The server cannot be reached. Try again.' });
        }
        if (!counted) { counted = true; state.retrying += 1; }
        beginRetry(reason, activeUrl);
        await sleep(delay, signal);
      }
    } finally {
      if (counted) releaseRetry(session);
    }
  }

  function releaseRetry(session) {
    if (session === state.session) state.retrying = Math.max(0, state.retrying - 1);
  }

  function errorText(err) {
    if (err instanceof ApiError) return err.message;
    return String((err && err.message) || err);
  }

  // ------------------------------------------------------------------ session
  function saveSession() {
    sessionStorage.setItem(KEY.token, state.token);
    sessionStorage.setItem(KEY.userId, String(state.userId));
    sessionStorage.setItem(KEY.username, state.username || '');
  }

  function clearSession() {
    for (const k of Object.values(KEY)) sessionStorage.removeItem(k);
  }

  function resetState() {
    if (state.abort) state.abort.abort();
    state.session += 1;
    state.abort = new AbortController();
    state.cursor = null;
    state.groups = new Map();
    state.views = new Map();
    state.deleted = new Set();
    state.currentGroupId = null;
    state.retrying = 0;
    $('group-list').replaceChildren();
    $('message-list').replaceChildren();
    $('member-list').replaceChildren();
    $('notices').replaceChildren();
  }

  function showLogin(message) {
    resetState();
    state.token = null;
    state.userId = null;
    state.username = null;
    clearSession();
    show($('chat-view'), false);
    show($('user-box'), false);
    show($('login-view'), true);
    showText($('login-error'), message || '');
    $('login-username').focus();
  }

  function onUnauthorized() {
    showLogin('Your session has ended: please sign in again.');
  }

  async function onLoginSubmit(ev) {
    ev.preventDefault();
    const username = $('login-username').value.trim();
    const password = $('login-password').value;
    showText($('login-error'), '');
    $('login-submit').disabled = true;
    try {
      const data = await api('POST', 'login', { body: { username, password } });
      state.token = data.token;
      state.userId = data.userId;
      state.username = data.username || username;
      saveSession();
      $('login-password').value = '';
      await startSession();
    } catch (err) {
      if (!(err instanceof SessionEnded)) showText($('login-error'), errorText(err));
    } finally {
      $('login-submit').disabled = false;
    }
  }

  async function onLogout() {
    const token = state.token;
    showLogin('');
    if (!token) return;
    try { // best effort; the token is already forgotten locally
      await fetch(buildUrl('logout'), { method: 'POST', headers: { Authorization: `Bearer ${token}`, Accept: 'application/json' } });
    } catch (e) { /* ignore */ }
  }

  async function startSession() {
    resetState();
    const session = state.session;
    show($('login-view'), false);
    show($('chat-view'), true);
    show($('user-box'), true);
    $('current-user').textContent = state.username || '';
    try {
      // 1. the current cursor, 2. my groups, 3. history of the open group, 4. follow /events.
      const first = await api('GET', 'events', { retryForMs: Infinity });
      if (session !== state.session) return;
      state.cursor = first.cursor;
      await loadGroups();
      const remembered = Number(sessionStorage.getItem(KEY.group));
      const initial = state.groups.has(remembered) ? remembered : (state.groups.size ? state.groups.keys().next().value : null);
      if (initial !== null) await selectGroup(initial);
      else renderGroupPane();
    } catch (err) {
      if (err instanceof SessionEnded || session !== state.session) return;
      showText($('group-error'), errorText(err));
    }
    if (session === state.session && state.cursor !== null) eventLoop(session);
  }

  // ------------------------------------------------------------------ groups
  async function loadGroups() {
    const data = await api('GET', 'chats', { retryForMs: Infinity });
    const fresh = new Map();
    for (const g of data.chats || []) fresh.set(g.id, g);
    state.groups = fresh;
    for (const id of Array.from(state.views.keys())) if (!fresh.has(id)) state.views.delete(id);
    if (state.currentGroupId !== null && !fresh.has(state.currentGroupId)) {
      state.currentGroupId = null;
      renderGroupPane();
    }
    renderGroupList();
  }

  function renderGroupList() {
    const list = $('group-list');
    const groups = Array.from(state.groups.values()).sort((a, b) => a.name.localeCompare(b.name) || a.id - b.id);
    list.replaceChildren(...groups.map((g) => {
      const view = state.views.get(g.id);
      const unread = view ? view.unread : 0;
      const button = el('button', {
        type: 'button',
        className: `group${g.id === state.currentGroupId ? ' selected' : ''}`,
        'data-testid': 'group',
        'aria-current': g.id === state.currentGroupId ? 'true' : null,
        dataset: { id: String(g.id) },
      }, [
        el('span', { className: 'group-name', text: g.name }),
        el('span', { className: 'badge', 'data-testid': 'unread', text: unread ? String(unread) : '', hidden: unread ? null : '' }),
      ]);
      button.addEventListener('click', () => { selectGroup(g.id).catch(reportGroupError); });
      return el('li', { dataset: { id: String(g.id) } }, [button]);
    }));
    show($('no-groups'), groups.length === 0);
  }

  function reportGroupError(err) {
    if (!(err instanceof SessionEnded)) showText($('group-error'), errorText(err));
  }

  function viewFor(groupId) {
    let view = state.views.get(groupId);
    if (!view) {
      view = { loaded: false, nextBefore: null, messages: new Map(), unread: 0 };
      state.views.set(groupId, view);
    }
    return view;
  }

  async function selectGroup(groupId) {
    const session = state.session;
    state.currentGroupId = groupId;
    sessionStorage.setItem(KEY.group, String(groupId));
    const view = viewFor(groupId);
    view.unread = 0;
    showText($('send-error'), '');
    showText($('member-info'), '');
    renderGroupList();
    renderGroupPane();
    loadMembers(groupId).catch(() => {});
    if (!view.loaded) {
      const page = await api('GET', 'messages', { query: { groupId, limit: PAGE_SIZE }, retryForMs: Infinity });
      if (session !== state.session) return;
      addMessages(groupId, page.messages || []);
      view.nextBefore = page.nextBefore;
      view.loaded = true;
      if (state.currentGroupId === groupId) renderMessages(true);
    }
  }

  function renderGroupPane() {
    const g = state.groups.get(state.currentGroupId);
    show($('group-pane'), Boolean(g));
    show($('no-group-selected'), !g);
    if (!g) return;
    $('group-title').textContent = g.name;
    renderMessages(true);
  }

  async function loadMembers(groupId) {
    const data = await api('GET', 'group-users', { query: { groupId } });
    if (state.currentGroupId !== groupId) return;
    const users = (data.users || []).slice().sort((a, b) => a.username.localeCompare(b.username));
    $('member-list').replaceChildren(...users.map((u) => el('li', {
      className: `member${u.id === state.userId ? ' me' : ''}`, text: u.username, dataset: { id: String(u.id) },
    })));
  }

  async function onCreateGroup(ev) {
    ev.preventDefault();
    const input = $('new-group-name');
    const name = input.value.trim();
    if (!name) return;
    showText($('group-error'), '');
    $('create-group').disabled = true;
    try {
      const group = await api('POST', 'groups', { body: { name, memberIds: [] } });
      input.value = '';
      state.groups.set(group.id, { id: group.id, name: group.name, createdBy: group.createdBy, createdAt: group.createdAt });
      await selectGroup(group.id);
    } catch (err) {
      reportGroupError(err);
    } finally {
      $('create-group').disabled = false;
    }
  }

  async function onAddMember(ev) {
    ev.preventDefault();
    const groupId = state.currentGroupId;
    const input = $('add-member-username');
    const username = input.value.trim();
    if (groupId === null || !username) return;
    showText($('member-info'), '');
    $('add-member').disabled = true;
    try {
      const res = await api('POST', `groups/${encodeURIComponent(groupId)}/members`, { body: { username } });
      input.value = '';
      $('member-info').classList.remove('error');
      showText($('member-info'), res.added ? `${username} added.` : `${username} is already a member.`);
      await loadMembers(groupId);
    } catch (err) {
      if (err instanceof SessionEnded) return;
      $('member-info').classList.add('error');
      showText($('member-info'), err instanceof ApiError && err.status === 404 ? `No user named "${username}".` : errorText(err));
    } finally {
      $('add-member').disabled = false;
    }
  }

  // ------------------------------------------------------------------ messages
  function addMessages(groupId, messages) {
    const view = viewFor(groupId);
    let added = 0;
    for (const m of messages) {
      if (state.deleted.has(m.id) || view.messages.has(m.id)) continue;
      view.messages.set(m.id, m);
      added += 1;
    }
    return added;
  }

  function messageElement(m) {
    const mine = m.userId === state.userId;
    const li = el('li', {
      className: `message${mine ? ' mine' : ''}`,
      'data-testid': 'message',
      dataset: { id: String(m.id), userId: String(m.userId) },
    }, [
      el('div', { className: 'meta' }, [
        el('span', { className: 'author', 'data-testid': 'message-author', text: m.username || `user ${m.userId}` }),
        el('time', { className: 'time', datetime: m.createdAt, title: m.createdAt, text: formatTime(m.createdAt) }),
      ]),
      el('div', { className: 'content', 'data-testid': 'message-content', text: m.content }),
    ]);
    if (mine) {
      const del = el('button', {
        type: 'button', className: 'delete-message', 'data-testid': 'delete-message',
        title: 'Delete this message', 'aria-label': 'Delete this message', text: 'Delete',
      });
      del.addEventListener('click', () => deleteMessage(m.id, del));
      li.querySelector('.meta').appendChild(del);
    }
    return li;
  }

  function nearBottom(scroller) {
    return scroller.scrollHeight - scroller.scrollTop - scroller.clientHeight < 80;
  }

  // Re-render the open group's list from its Map (ids ascending: oldest at the top).
  function renderMessages(scrollToEnd) {
    const groupId = state.currentGroupId;
    const view = state.views.get(groupId);
    const list = $('message-list');
    const scroller = $('message-scroller');
    if (!view) { list.replaceChildren(); return; }
    const stick = scrollToEnd || nearBottom(scroller);
    const existing = new Map();
    for (const node of list.querySelectorAll('li.message')) existing.set(Number(node.dataset.id), node);
    const ids = Array.from(view.messages.keys()).sort((a, b) => a - b);
    const nodes = ids.map((id) => existing.get(id) || messageElement(view.messages.get(id)));
    const pending = Array.from(list.querySelectorAll('li.pending'));
    list.replaceChildren(...nodes, ...pending);
    show($('load-older'), view.loaded && view.nextBefore !== null && view.nextBefore !== undefined);
    show($('history-start'), view.loaded && (view.nextBefore === null || view.nextBefore === undefined) && ids.length > 0);
    if (stick) scroller.scrollTop = scroller.scrollHeight;
  }

  async function onLoadOlder() {
    const groupId = state.currentGroupId;
    const view = state.views.get(groupId);
    if (!view || view.nextBefore === null || view.nextBefore === undefined) return;
    const button = $('load-older');
    button.disabled = true;
    const scroller = $('message-scroller');
    const fromBottom = scroller.scrollHeight - scroller.scrollTop;
    try {
      const page = await api('GET', 'messages', { query: { groupId, before: view.nextBefore, limit: PAGE_SIZE } });
      addMessages(groupId, page.messages || []);
      view.nextBefore = page.nextBefore;
      if (state.currentGroupId === groupId) {
        renderMessages(false);
        scroller.scrollTop = scroller.scrollHeight - fromBottom; // keep the reader's place
      }
    } catch (err) {
      if (!(err instanceof SessionEnded)) showText($('send-error'), errorText(err));
    } finally {
      button.disabled = false;
    }
  }

  async function onSend(ev) {
    ev.preventDefault();
    const groupId = state.currentGroupId;
    const input = $('message-input');
    const content = input.value;
    if (groupId === null || !content.trim()) return;
    showText($('send-error'), '');
    input.value = '';
    const clientMessageId = uuid4(); // the same id on every retry: the server stores it once
    const pending = el('li', { className: 'pending', 'data-testid': 'pending-message', dataset: { clientId: clientMessageId } }, [
      el('div', { className: 'meta' }, [el('span', { className: 'author', text: state.username || '' }), el('span', { className: 'time', text: 'sending…' })]),
      el('div', { className: 'content', text: content }),
    ]);
    $('message-list').appendChild(pending);
    $('message-scroller').scrollTop = $('message-scroller').scrollHeight;
    try {
      // the key also as a header: a proxy (deploy/haproxy.cfg) may then safely resend the request
      const message = await api('POST', 'messages', {
        body: { groupId, content, clientMessageId }, headers: { 'Idempotency-Key': clientMessageId },
      });
      pending.remove();
      addMessages(groupId, [message]);
      if (state.currentGroupId === groupId) renderMessages(true);
    } catch (err) {
      pending.remove();
      if (err instanceof SessionEnded) return;
      if (!input.value) input.value = content; // give the text back
      showText($('send-error'), `Not sent: ${errorText(err)}`);
    }
  }

  function onComposeKey(ev) {
    if (ev.key === 'Enter' && !ev.shiftKey && !ev.isComposing) {
      ev.preventDefault();
      $('compose-form').requestSubmit();
    }
  }

  async function deleteMessage(messageId, button) {
    button.disabled = true;
    try {
      await api('DELETE', 'messages', { body: { messageId } });
      removeMessage(messageId);
    } catch (err) {
      if (err instanceof SessionEnded) return;
      if (err instanceof ApiError && err.status === 404) { removeMessage(messageId); return; }
      button.disabled = false;
      showText($('send-error'), `Not deleted: ${errorText(err)}`);
    }
  }

  function removeMessage(messageId) {
    state.deleted.add(messageId);
    for (const view of state.views.values()) view.messages.delete(messageId);
    const node = $('message-list').querySelector(`li.message[data-id="${Number(messageId)}"]`);
    if (node) node.remove();
  }

  function showNotice(groupId, text) {
    if (groupId !== state.currentGroupId) return;
    const box = $('notices');
    const note = el('div', { className: 'notice', 'data-testid': 'notice', text });
    box.appendChild(note);
    while (box.children.length > 3) box.firstChild.remove();
    setTimeout(() => note.remove(), 8000);
  }

  // ------------------------------------------------------------------ live events
  async function eventLoop(session) {
    while (session === state.session) {
      let page;
      try {
        page = await api('GET', 'events', {
          query: { since: state.cursor, timeout: POLL_TIMEOUT_S },
          timeoutMs: (POLL_TIMEOUT_S + 15) * 1000,
          retryForMs: Infinity,
        });
      } catch (err) {
        if (err instanceof SessionEnded || session !== state.session) return;
        if (err instanceof ApiError && err.code === 'cursor_expired') {
          await resync(session);
          continue;
        }
        if (err instanceof ApiError && err.status === 401) return; // onUnauthorized ran
        beginRetry(errorText(err));
        try { await sleep(backoff(4), state.abort.signal); } catch (e) { return; }
        continue;
      }
      if (session !== state.session) return;
      for (const event of page.events || []) applyEvent(event);
      if (page.cursor !== undefined && page.cursor !== null) state.cursor = page.cursor;
    }
  }

  // 410 cursor_expired: take a fresh cursor, then reload groups and history.
  async function resync(session) {
    try {
      const first = await api('GET', 'events', { retryForMs: Infinity });
      if (session !== state.session) return;
      state.cursor = first.cursor;
      state.views = new Map();
      await loadGroups();
      if (state.currentGroupId !== null) await selectGroup(state.currentGroupId);
    } catch (err) {
      if (!(err instanceof SessionEnded)) reportGroupError(err);
    }
  }

  function applyEvent(event) {
    const groupId = event.groupId;
    const data = event.data || {};
    switch (event.type) {
      case 'message.created': {
        // kept even when the group's history is not loaded yet: a history page answered just
        // before this message was stored merges with it instead of losing it
        const added = addMessages(groupId, [data]);
        if (!added) break;
        if (groupId === state.currentGroupId) renderMessages(false);
        else if (data.userId !== state.userId && state.groups.has(groupId)) {
          viewFor(groupId).unread += 1;
          renderGroupList();
        }
        break;
      }
      case 'message.deleted':
        removeMessage(data.id);
        break;
      case 'group.created':
        if (data && data.id !== undefined) {
          state.groups.set(data.id, { id: data.id, name: data.name, createdBy: data.createdBy, createdAt: data.createdAt });
          renderGroupList();
        }
        break;
      case 'member.added':
        if (data.userId === state.userId && !state.groups.has(groupId)) loadGroups().catch(reportGroupError);
        else if (groupId === state.currentGroupId) loadMembers(groupId).catch(() => {});
        break;
      case 'member.removed':
        if (data.userId === state.userId) {
          state.groups.delete(groupId);
          state.views.delete(groupId);
          if (state.currentGroupId === groupId) { state.currentGroupId = null; renderGroupPane(); }
          renderGroupList();
        } else if (groupId === state.currentGroupId) {
          loadMembers(groupId).catch(() => {});
        }
        break;
      case 'group.notify': {
        const msg = data.message;
        const text = typeof msg === 'string' ? msg : JSON.stringify(msg);
        showNotice(groupId, `Notice: ${text}`);
        break;
      }
      default:
        break;
    }
  }

  // ------------------------------------------------------------------ node status
  async function pollHealth() {
    try {
      const answer = await fetchOnce('GET', buildUrl('health'), undefined, 4000, null);
      if (answer.status === 200 && answer.data && typeof answer.data.active === 'boolean') {
        if (answer.data.active) markReachable('active', answer.data.node);
        else if (state.retrying === 0) markReachable('passive', answer.data.node);
      } else if (state.retrying === 0) {
        beginRetry(`HTTP ${answer.status}`);
      }
    } catch (e) {
      if (state.retrying === 0) beginRetry('connection lost');
    }
  }

  // ------------------------------------------------------------------ start
  function init() {
    $('login-form').addEventListener('submit', onLoginSubmit);
    $('logout').addEventListener('click', onLogout);
    $('new-group-form').addEventListener('submit', onCreateGroup);
    $('add-member-form').addEventListener('submit', onAddMember);
    $('compose-form').addEventListener('submit', onSend);
    $('message-input').addEventListener('keydown', onComposeKey);
    $('load-older').addEventListener('click', onLoadOlder);

    pollHealth();
    setInterval(pollHealth, HEALTH_EVERY_MS);

    const token = sessionStorage.getItem(KEY.token);
    if (token) {
      state.token = token;
      state.userId = Number(sessionStorage.getItem(KEY.userId));
      state.username = sessionStorage.getItem(KEY.username) || '';
      startSession();
    } else {
      showLogin('');
    }
  }

  // for browser tests and debugging: read-only look at the state
  window.hachat = { state };

  if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', init);
  else init();
})();
