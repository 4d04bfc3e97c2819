//! For the clients that poll: tags and 304s, long polls woken by the
//! settlement, the list's If-Match (412), and money movements made safe to
//! retry with an Idempotency-Key.

use crate::helpers::{Link, TcpProxy, TestApp, User, assert_error, eventually};
use reqwest::header::{CACHE_CONTROL, ETAG, IF_MATCH, IF_NONE_MATCH, LINK, LOCATION, RETRY_AFTER};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use std::time::Duration;

fn header(r: &reqwest::Response, name: impl reqwest::header::AsHeaderName) -> String {
    r.headers().get(name).map(|v| v.to_str().unwrap().to_string()).unwrap_or_default()
}

/// A lock on the user's account row in billing: payments of the user wait
/// (unanswered, their orders pending) until it is released.
async fn hold_payments(app: &TestApp, user: &User) -> sqlx::Transaction<'static, sqlx::Postgres> {
    let billing = app.db("billing").await;
    let mut tx = billing.begin().await.unwrap();
    sqlx::query("SELECT balance FROM accounts WHERE user_id = $1 FOR UPDATE")
        .bind(user.id)
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    tx
}

async fn place(app: &TestApp, user: &User, price: u32) -> Value {
    let r = app.post(user, "/ordering/orders", json!({"price": price})).await;
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    r.json().await.unwrap()
}

#[tokio::test]
async fn an_order_is_followed_with_tags_and_an_unchanged_order_is_304() {
    let app = TestApp::spawn().await;
    let user = app.user_with(50).await;
    let held = hold_payments(&app, &user).await;

    // The 202 says how to follow the order.
    let id = app.place_order(&user, 20).await;
    let r = app.post(&user, "/ordering/orders", json!({"price": 5})).await;
    assert_eq!(
        header(&r, LOCATION),
        format!("/api/v1/ordering/orders/{}", r.json::<Value>().await.unwrap()["id"].as_str().unwrap())
    );
    let r = app.call(Some(&user), Method::GET, &format!("/ordering/orders/{id}"), None).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(header(&r, CACHE_CONTROL), "private, no-cache");
    assert_eq!(header(&r, LINK), "</api/v1/push/orders>; rel=\"monitor\"", "a pending order links its event stream");
    assert_eq!(header(&r, RETRY_AFTER), "1");
    let tag = header(&r, ETAG);
    assert!(tag.starts_with('"') && tag.ends_with('"'), "a strong tag: {tag}");

    let get = |inm: &str| {
        app.http
            .get(app.url(&format!("/ordering/orders/{id}")))
            .bearer_auth(&user.token)
            .header(IF_NONE_MATCH, inm.to_string())
            .send()
    };
    let r = get(&tag).await.unwrap();
    assert_eq!(r.status(), StatusCode::NOT_MODIFIED);
    assert_eq!(header(&r, ETAG), tag);
    assert!(r.bytes().await.unwrap().is_empty(), "no body");
    assert_eq!(get("\"something else\"").await.unwrap().status(), StatusCode::OK);
    assert_eq!(get(&format!("W/{tag}, \"x\"")).await.unwrap().status(), StatusCode::NOT_MODIFIED, "weak comparison");

    held.commit().await.unwrap();
    let settled = app.settled_order(&user, &id).await;
    assert_eq!(settled["status"], "succeeded");
    let r = get(&tag).await.unwrap();
    assert_eq!(r.status(), StatusCode::OK, "the settlement changed the tag");
    assert_ne!(header(&r, ETAG), tag);
    assert_eq!(header(&r, LINK), "", "a settled order has nothing more to follow");
    let new_tag = header(&r, ETAG);
    assert_eq!(get(&new_tag).await.unwrap().status(), StatusCode::NOT_MODIFIED);
    app.stop().await;
}

#[tokio::test]
async fn a_settled_orders_304_needs_no_database_and_is_never_another_users() {
    let app = TestApp::spawn().await;
    let (user, other) = (app.user().await, app.user().await);
    app.deposit(&user, 50).await;
    let id = place(&app, &user, 20).await["id"].as_str().unwrap().to_string();
    assert_eq!(app.settled_order(&user, &id).await["status"], "succeeded");
    // Straight to ordering, as the gateway calls it (its own memory is another test's).
    let path = format!("/api/v1/orders/{id}");
    let get = |who: &User, inm: Option<&str>| {
        let assertion = app.assertion("ordering", Method::GET, &path, who);
        let mut req = app
            .http
            .get(format!("{}{path}", app.service_url("ordering")))
            .header(runtime::auth::ASSERTION_HEADER, assertion);
        if let Some(tag) = inm {
            req = req.header(IF_NONE_MATCH, tag.to_string());
        }
        req.send()
    };
    let r = get(&user, None).await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(header(&r, "x-final-representation"), "1", "ordering tells the gateway the order is final");
    let tag = header(&r, ETAG);
    assert_eq!(get(&other, Some(&tag)).await.unwrap().status(), StatusCode::NOT_FOUND);

    // The orders out of the database's reach: what reads them fails, the
    // settled order's tag known to ordering does not.
    let ordering = app.db("ordering").await;
    sqlx::query("ALTER TABLE orders RENAME TO orders_away").execute(&ordering).await.unwrap();
    let r = get(&user, Some(&tag)).await.unwrap();
    assert_eq!(r.status(), StatusCode::NOT_MODIFIED, "answered without the database");
    assert_eq!((header(&r, ETAG), header(&r, CACHE_CONTROL)), (tag.clone(), "private, no-cache".to_string()));
    assert!(get(&user, None).await.unwrap().status().is_server_error(), "without the tag it reads the database");
    assert!(get(&user, Some("\"stale\"")).await.unwrap().status().is_server_error(), "another tag: it reads too");
    assert!(
        get(&other, Some(&tag)).await.unwrap().status().is_server_error(),
        "another user's request for the order is never answered from memory"
    );
    sqlx::query("ALTER TABLE orders_away RENAME TO orders").execute(&ordering).await.unwrap();
    assert_eq!(get(&other, Some(&tag)).await.unwrap().status(), StatusCode::NOT_FOUND);
    assert_eq!(get(&user, Some(&tag)).await.unwrap().status(), StatusCode::NOT_MODIFIED);
    app.stop().await;
}

#[tokio::test]
async fn the_gateway_answers_a_settled_orders_304_itself_to_its_user_while_the_token_holds() {
    let mut app = TestApp::spawn().await;
    let ordering = app.service_url("ordering");
    let proxy = TcpProxy::before(&ordering).await;
    let gateway = app.gateway_to(&proxy.url(&ordering), 5).await;
    let (user, other) = (app.user().await, app.user().await);
    app.deposit(&user, 50).await;
    let settled = place(&app, &user, 20).await["id"].as_str().unwrap().to_string();
    app.settled_order(&user, &settled).await;
    let held = hold_payments(&app, &user).await;
    let pending = place(&app, &user, 5).await["id"].as_str().unwrap().to_string();
    let get = |who: &User, id: &str, inm: Option<&str>| {
        let mut req = app.http.get(format!("{gateway}/api/v1/ordering/orders/{id}")).bearer_auth(&who.token);
        if let Some(tag) = inm {
            req = req.header(IF_NONE_MATCH, tag.to_string());
        }
        req.send()
    };
    let r = get(&user, &settled, None).await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(header(&r, "x-final-representation"), "", "the service's word for the gateway stays inside");
    let tag = header(&r, ETAG);
    let pending_tag = header(&get(&user, &pending, None).await.unwrap(), ETAG);

    // Ordering out of reach: only what the gateway knows is final is answered.
    proxy.set(Link::Cut);
    let r = get(&user, &settled, Some(&tag)).await.unwrap();
    assert_eq!(r.status(), StatusCode::NOT_MODIFIED);
    assert_eq!((header(&r, ETAG), header(&r, CACHE_CONTROL)), (tag.clone(), "private, no-cache".to_string()));
    let unavailable = StatusCode::SERVICE_UNAVAILABLE;
    assert_eq!(get(&user, &settled, None).await.unwrap().status(), unavailable);
    assert_eq!(get(&user, &settled, Some("\"stale\"")).await.unwrap().status(), unavailable);
    assert_eq!(
        get(&user, &pending, Some(&pending_tag)).await.unwrap().status(),
        unavailable,
        "a pending order may change"
    );
    assert_eq!(get(&other, &settled, Some(&tag)).await.unwrap().status(), unavailable, "never to another user");
    let r = app.http.get(format!("{gateway}/api/v1/ordering/orders/{settled}")).header(IF_NONE_MATCH, &tag).send();
    assert_eq!(r.await.unwrap().status(), StatusCode::UNAUTHORIZED, "never without the token");

    // Logged out (through the other gateway): this one learns it from the
    // revoked-token list, and its memory answers that token no more.
    assert!(app.post(&user, "/identity/logout", json!({})).await.status().is_success());
    eventually(Duration::from_secs(10), || async {
        (get(&user, &settled, Some(&tag)).await.ok()?.status() == StatusCode::UNAUTHORIZED).then_some(())
    })
    .await;
    proxy.set(Link::Open);
    held.commit().await.unwrap();
    app.stop().await;
}

#[tokio::test]
async fn a_long_poll_is_answered_by_the_settlement_on_another_replica() {
    let mut app = TestApp::spawn().await;
    // Replica B serves the API only: the settlement happens on the first one.
    // Its gateway gives a service 1 s to start answering: long polls get more.
    let replica = app.ordering_replica(true).await;
    let gateway_b = app.gateway_to(&replica, 1).await;
    let user = app.user_with(50).await;
    let held = hold_payments(&app, &user).await;
    let order = place(&app, &user, 20).await;
    let id = order["id"].as_str().unwrap().to_string();
    let url = format!("{gateway_b}/api/v1/ordering/orders/{id}");

    // Nothing changes for 2 s: the client's copy is current (304), after the wait.
    let r = app.http.get(&url).bearer_auth(&user.token).send().await.unwrap();
    let tag = header(&r, ETAG);
    let r = app
        .http
        .get(&url)
        .bearer_auth(&user.token)
        .header("Prefer", "wait=2")
        .header(IF_NONE_MATCH, &tag)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_MODIFIED, "not cut by the gateway's 1 s timeout");
    assert_eq!(header(&r, "preference-applied"), "wait=2");

    // A long poll held on B; the payment answered once it waits.
    let poll = tokio::spawn({
        let req = app.http.get(&url).bearer_auth(&user.token).header("Prefer", "wait=30").header(IF_NONE_MATCH, &tag);
        async move { req.send().await.unwrap() }
    });
    app.long_polls_waiting(1).await;
    assert!(!poll.is_finished(), "the long poll waits while the order is pending");
    held.commit().await.unwrap();
    let r = poll.await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(header(&r, "preference-applied"), "wait=30");
    assert_ne!(header(&r, ETAG), tag);
    let settled: Value = r.json().await.unwrap();
    assert_eq!(settled["status"], "succeeded", "answered with the settled order, not at the deadline");

    // A wait longer than the cap is capped; a settled order is answered at once.
    let r = app.http.get(&url).bearer_auth(&user.token).header("Prefer", "wait=3600").send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.json::<Value>().await.unwrap()["status"], "succeeded");
    app.stop().await;
}

#[tokio::test]
async fn waiting_long_polls_end_cleanly_on_shutdown() {
    let app = TestApp::spawn().await;
    let user = app.user_with(50).await;
    let held = hold_payments(&app, &user).await;
    let order = place(&app, &user, 20).await;
    let id = order["id"].as_str().unwrap();
    let poll = tokio::spawn(
        app.http
            .get(app.url(&format!("/ordering/orders/{id}")))
            .bearer_auth(&user.token)
            .header("Prefer", "wait=30")
            .send(),
    );
    app.long_polls_waiting(1).await;
    assert!(!poll.is_finished());
    app.begin_shutdown();
    let r = tokio::time::timeout(Duration::from_secs(20), poll).await.expect("answered on shutdown").unwrap().unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.json::<Value>().await.unwrap()["status"], "pending", "the order as it is");
    held.rollback().await.unwrap();
    app.stop().await;
}

#[tokio::test]
async fn an_order_placed_against_a_stale_list_tag_is_refused_with_412() {
    let app = TestApp::spawn().await;
    let user = app.user_with(100).await;
    let list = || app.call(Some(&user), Method::GET, "/ordering/orders", None);
    let r = list().await;
    let empty = header(&r, ETAG);
    assert_eq!(header(&r, CACHE_CONTROL), "private, no-cache");
    let post = |tag: String| {
        app.http
            .post(app.url("/ordering/orders"))
            .bearer_auth(&user.token)
            .header(IF_MATCH, tag)
            .json(&json!({"price": 10}))
            .send()
    };
    // The order stays pending until the list's tag has been read below:
    // its settlement, which changes the tag again, must come after.
    let held = hold_payments(&app, &user).await;
    // A double click on a page that showed the list: one order.
    let (a, b) = tokio::join!(post(empty.clone()), post(empty.clone()));
    let mut statuses = [a.unwrap().status(), b.unwrap().status()];
    statuses.sort();
    assert_eq!(statuses, [StatusCode::ACCEPTED, StatusCode::PRECONDITION_FAILED]);
    assert_error(post(empty.clone()).await.unwrap(), StatusCode::PRECONDITION_FAILED, "changed").await;

    let r = list().await;
    let one = header(&r, ETAG);
    assert_ne!(one, empty);
    let orders: Vec<Value> = r.json().await.unwrap();
    assert_eq!(orders.len(), 1);
    assert_eq!(orders[0]["status"], "pending");
    // The settlement changes the list too.
    held.rollback().await.unwrap();
    app.settled_order(&user, orders[0]["id"].as_str().unwrap()).await;
    let settled = header(&list().await, ETAG);
    assert_ne!(settled, one);
    let r = app
        .http
        .get(app.url("/ordering/orders?limit=5"))
        .bearer_auth(&user.token)
        .header(IF_NONE_MATCH, &settled)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_MODIFIED);
    assert_eq!(post(settled.clone()).await.unwrap().status(), StatusCode::ACCEPTED, "the current tag");
    assert_eq!(post("W/\"x\"".into()).await.unwrap().status(), StatusCode::PRECONDITION_FAILED);
    // Without If-Match nothing changes.
    place(&app, &user, 1).await;
    assert_eq!(app.get::<Vec<Value>>(&user, "/ordering/orders").await.len(), 3);
    app.stop().await;
}

#[tokio::test]
async fn the_notification_page_has_a_tag_and_an_unchanged_one_is_304() {
    let app = TestApp::spawn().await;
    let user = app.user().await;
    let page = |inm: Option<String>| {
        let mut req = app.http.get(app.url("/notifications")).bearer_auth(&user.token);
        if let Some(tag) = inm {
            req = req.header(IF_NONE_MATCH, tag);
        }
        req.send()
    };
    let empty = header(&page(None).await.unwrap(), ETAG);
    assert_eq!(page(Some(empty.clone())).await.unwrap().status(), StatusCode::NOT_MODIFIED);
    let order = place(&app, &user, 10).await; // fails: no money; a notification says so
    app.settled_order(&user, order["id"].as_str().unwrap()).await;
    let r = eventually(Duration::from_secs(20), || async {
        let r = page(Some(empty.clone())).await.unwrap();
        (r.status() == StatusCode::OK).then_some(r)
    })
    .await;
    assert_ne!(header(&r, ETAG), empty);
    assert_eq!(r.json::<Vec<Value>>().await.unwrap().len(), 1);
    app.stop().await;
}

#[tokio::test]
async fn a_deposit_or_withdrawal_retried_with_its_key_is_applied_once() {
    let app = TestApp::spawn().await;
    let user = app.user().await;
    let send = |path: &'static str, key: &'static str, amount: u32| {
        app.post_with_key(&user, path, key, json!({"amount": amount}))
    };
    // Two requests with one key racing, then a retry: one deposit.
    let (a, b) =
        tokio::join!(send("/billing/account/deposit", "dep-1", 40), send("/billing/account/deposit", "dep-1", 40));
    assert_eq!((a.unwrap().status(), b.unwrap().status()), (StatusCode::NO_CONTENT, StatusCode::NO_CONTENT));
    assert_eq!(send("/billing/account/deposit", "dep-1", 40).await.unwrap().status(), StatusCode::NO_CONTENT);
    assert_eq!(app.balance(&user).await, 40.0, "deposited once");
    assert_error(
        send("/billing/account/deposit", "dep-1", 41).await.unwrap(),
        StatusCode::UNPROCESSABLE_ENTITY,
        "another amount",
    )
    .await;

    let (a, b) =
        tokio::join!(send("/billing/account/withdraw", "wd-1", 15), send("/billing/account/withdraw", "wd-1", 15));
    assert_eq!((a.unwrap().status(), b.unwrap().status()), (StatusCode::NO_CONTENT, StatusCode::NO_CONTENT));
    assert_eq!(send("/billing/account/withdraw", "wd-1", 15).await.unwrap().status(), StatusCode::NO_CONTENT);
    assert_eq!(app.balance(&user).await, 25.0, "withdrawn once");
    // The same key for another operation is another key.
    assert_eq!(
        send("/billing/account/withdraw", "dep-1", 40).await.unwrap().status(),
        StatusCode::UNPROCESSABLE_ENTITY
    );
    // A refused withdrawal keeps no key: once the money is there, the retry works.
    assert_error(
        send("/billing/account/withdraw", "wd-2", 30).await.unwrap(),
        StatusCode::UNPROCESSABLE_ENTITY,
        "not enough",
    )
    .await;
    assert_eq!(send("/billing/account/deposit", "dep-2", 5).await.unwrap().status(), StatusCode::NO_CONTENT);
    assert_eq!(send("/billing/account/withdraw", "wd-2", 30).await.unwrap().status(), StatusCode::NO_CONTENT);
    assert_eq!(app.balance(&user).await, 0.0);
    let bad = send("/billing/account/deposit", "has space", 1).await.unwrap();
    assert_error(bad, StatusCode::BAD_REQUEST, "Idempotency-Key").await;

    // A key past its time is free again, and pruning deletes it.
    let billing = app.db("billing").await;
    sqlx::query("UPDATE idempotency_keys SET created_at = now() - interval '25 hours' WHERE key = 'dep-1'")
        .execute(&billing)
        .await
        .unwrap();
    assert_eq!(send("/billing/account/deposit", "dep-1", 40).await.unwrap().status(), StatusCode::NO_CONTENT);
    assert_eq!(app.balance(&user).await, 40.0, "an expired key is a new deposit");
    sqlx::query("UPDATE idempotency_keys SET created_at = now() - interval '25 hours' WHERE key = 'wd-1'")
        .execute(&billing)
        .await
        .unwrap();
    let pruned = runtime::http::idempotency::prune(&Default::default()).once(&billing).await.unwrap();
    assert_eq!(pruned, 1);
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM idempotency_keys").fetch_one(&billing).await.unwrap();
    assert_eq!(left, 3, "dep-1 (again), dep-2, wd-2");
    app.stop().await;
}
