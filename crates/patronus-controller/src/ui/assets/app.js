// Patronus dashboard: the one script the pages load (served by the controller, under a CSP that
// allows no other). It keeps a page live without reloading it: it follows the controller's
// event stream (/ui/stream, the API's /api/v1/events/stream for this session) and, when an
// event comes, marks a path that went down at once, then fetches the page again and swaps the
// regions marked data-live (the server renders them; the script draws nothing itself). Times
// are shown in the browser's zone. If the session has ended, it goes to the login.
(function () {
  'use strict';

  var KINDS = 'path.down,path.up,sla.violated,failover,site.online,site.offline,config.changed';
  var live = document.getElementById('live');
  var timer = null;
  var busy = false;
  var again = false;

  function status(state, text) {
    if (live) {
      live.setAttribute('data-state', state);
      live.textContent = text;
    }
  }

  function localTimes(root) {
    var els = root.querySelectorAll('time[data-ms]');
    for (var i = 0; i < els.length; i++) {
      var d = new Date(Number(els[i].getAttribute('data-ms')));
      if (!isNaN(d.getTime())) {
        var today = new Date().toDateString() === d.toDateString();
        els[i].textContent = today ? d.toLocaleTimeString() : d.toLocaleString();
      }
    }
  }

  function toLogin() {
    window.location.assign('/ui/login?next=' + encodeURIComponent(window.location.pathname + window.location.search));
  }

  function refresh() {
    if (busy) {
      again = true;
      return;
    }
    busy = true;
    fetch(window.location.href, { credentials: 'same-origin', headers: { 'X-Patronus-Refresh': '1' } })
      .then(function (r) {
        if (r.redirected && new URL(r.url).pathname === '/ui/login') {
          toLogin();
          return null;
        }
        return r.ok ? r.text() : null;
      })
      .then(function (html) {
        if (!html) return;
        var doc = new DOMParser().parseFromString(html, 'text/html');
        var regions = document.querySelectorAll('[data-live]');
        for (var i = 0; i < regions.length; i++) {
          var fresh = doc.getElementById(regions[i].id);
          if (fresh) {
            var node = document.importNode(fresh, true);
            localTimes(node);
            regions[i].replaceWith(node);
          }
        }
        document.body.setAttribute('data-refreshed', String(Date.now()));
      })
      .catch(function () { /* the next event tries again */ })
      .then(function () {
        busy = false;
        if (again) {
          again = false;
          schedule();
        }
      });
  }

  function schedule() {
    if (timer === null) {
      timer = window.setTimeout(function () {
        timer = null;
        refresh();
      }, 100);
    }
  }

  function onEvent(e) {
    var d = null;
    try {
      d = JSON.parse(e.data);
    } catch (_) {
      return;
    }
    if (e.type === 'path.down' && d && d.data && d.data.path_id) {
      var els = document.querySelectorAll('[data-path]');
      for (var i = 0; i < els.length; i++) {
        if (els[i].getAttribute('data-path') === d.data.path_id) {
          els[i].setAttribute('data-state', 'down');
        }
      }
    }
    document.body.setAttribute('data-last-event', e.type + ' ' + (e.lastEventId || ''));
    schedule();
  }

  localTimes(document);
  if (!document.querySelector('[data-live]') || !window.EventSource) return;

  var es = new EventSource('/ui/stream?kind=' + KINDS);
  es.onopen = function () { status('on', 'live'); };
  es.onerror = function () {
    if (es.readyState === EventSource.CLOSED) {
      // Refused (the session ended) or gone: find out which by asking for the page.
      status('off', 'not live');
      refresh();
      window.setTimeout(function () {
        fetch('/ui/session', { credentials: 'same-origin' }).then(function (r) {
          if (r.status === 401) toLogin();
        });
      }, 2000);
    } else {
      status('connecting', 'reconnecting');
    }
  };
  var kinds = KINDS.split(',').concat(['gap']);
  for (var i = 0; i < kinds.length; i++) {
    es.addEventListener(kinds[i], onEvent);
  }
})();
