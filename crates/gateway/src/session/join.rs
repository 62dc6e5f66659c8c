//! The join: the history → live hand-over that makes a room gap-free, and what a join
//! replays ([`ReplayPlan`]).

use chat_protocol::{ErrorCode, FrameError, RoomName, ServerFrame};
use tracing::{debug, warn};

use super::Session;
use std::sync::Arc;

use crate::{
    bus::{Bus, Epoch, History, Msg},
    hub::{GoLive, MemberInfo},
    transport::{CloseReason, frame},
};

impl Session {
    /// Joins `room`, replaying what the client lacks, then goes live.
    ///
    /// **Invariant:** the client receives every id of the room after its starting point
    /// (`since`, or the start of the retained history) exactly once, in order, then
    /// `joined(last_id)`, then live messages from `last_id + 1` — or it is closed with 1013
    /// and resumes, never shown a hole or a duplicate. The history read and the live
    /// subscription are different Redis connections, so this holds because of the order:
    ///
    /// 1. **Register, then subscribe** ([`crate::hub::Hub::join`]): the member is in the
    ///    room as *joining* before the subscription is confirmed active, so every message
    ///    published from then on lands in its join buffer.
    /// 2. **Read history** after that: it holds every message published before the
    ///    subscription became active, and maybe some after (which the buffer holds too).
    /// 3. **Replay** the history, flow-controlled (the client may be slow).
    /// 4. **Go live** ([`crate::hub::Hub::go_live`], under the room's lock): queue the
    ///    buffered messages newer than the replay, then `joined`, and switch to live
    ///    delivery, which skips ids at or below the member's last. A hole in the buffer
    ///    (a lost live message) is filled by the room's repair.
    ///
    /// If live traffic overflows the join buffer during a long replay, the hand-over says
    /// [`GoLive::Retry`] and the session replays again from where it got; if history no
    /// longer reaches back that far, the client is closed with 1013 rather than shown a
    /// hole. A new epoch during the join closes it with 1013 too (its replay is void).
    pub(super) async fn join(
        &mut self,
        room: RoomName,
        since: Option<u64>,
        epoch: Option<String>,
        reference: Option<String>,
    ) {
        if self.rooms.iter().any(|(r, _)| *r == room) {
            let err = FrameError::new(ErrorCode::BadRequest, format!("already joined {room}"));
            return self.refuse(err.with_ref(reference)).await;
        }
        if !self.principal.may_join(&room) {
            let err = FrameError::new(
                ErrorCode::Forbidden,
                format!("your token does not allow room {room}"),
            );
            return self.refuse(err.with_ref(reference)).await;
        }
        let max = self.state.config.max_rooms_per_connection;
        if self.rooms.len() >= max {
            let err = FrameError::new(
                ErrorCode::Forbidden,
                format!("a connection may be in at most {max} rooms: leave one first"),
            );
            return self.refuse(err.with_ref(reference)).await;
        }
        self.rooms.push((room.clone(), false));
        let state = self.state.clone();
        // The bus calls are boxed: their futures are several KB each (fred inside), and
        // inline they would make every frame's future (and so its box) that large.
        let me = self.who();
        let info = MemberInfo {
            user: Arc::from(me.user.as_str()),
            signals: !self.legacy,
        };
        let registered =
            Box::pin(
                state
                    .hub
                    .join(&room, self.conn, self.outbox.clone(), info, &state.bus),
            )
            .await;
        if let Err(err) = registered {
            warn!(%room, error = %err, "join failed");
            return self.abort_join(&room, reference).await;
        }
        // Listed before the snapshot is read, so that the joiner's own `presence`
        // counts it.
        self.list(&room).await;
        if !self.hand_over(&room, since, epoch, reference).await {
            self.unlist(&room).await;
        }
    }

    /// Steps 2–4 of [`Session::join`]: replays and goes live. False when the join did not
    /// end live (the bus failed, answered `unavailable`; or the connection is closing).
    async fn hand_over(
        &mut self,
        room: &RoomName,
        since: Option<u64>,
        mut epoch: Option<String>,
        reference: Option<String>,
    ) -> bool {
        let state = self.state.clone();
        let mut since = since;
        let mut recovered = true;
        let mut first_pass = true;
        loop {
            let mut history = match since {
                Some(_) => Box::pin(state.bus.history(room, since)).await,
                // A fresh join replays the newest JOIN_REPLAY_LIMIT messages; older ones
                // are paged over HTTP.
                None => Box::pin(state.bus.page(room, None, state.config.join_replay_limit))
                    .await
                    .map(History::from),
            };
            if let Ok(h) = &history
                && since.is_some()
                && epoch.is_some()
                && h.epoch.as_deref() != epoch.as_deref()
            {
                // `since` is from another epoch: the whole history, not a tail, is due.
                let limit = state.config.join_replay_limit;
                history = Box::pin(state.bus.page(room, None, limit))
                    .await
                    .map(History::from);
            }
            let history = match history {
                Ok(h) => h,
                Err(err) => {
                    warn!(%room, error = %err, "history read failed");
                    self.abort_join(room, reference).await;
                    return false;
                }
            };
            let plan = ReplayPlan::new(since, epoch.as_deref(), history);
            if !first_pass && !plan.recovered {
                // The room moved faster than this client read its replay, beyond history.
                self.outbox.close(CloseReason::TooSlow);
                return false;
            }
            recovered &= plan.recovered;
            let replayed = plan.messages.len() as u64;
            for msg in plan.messages {
                if self
                    .outbox
                    .push_paced(frame::text(&msg.json))
                    .await
                    .is_err()
                {
                    return false;
                }
            }
            state.metrics.delivered.increment(replayed);
            let legacy = self.legacy;
            // Read after the subscription is active: the diffs that follow it are
            // delivered after it (go_live keeps them for this member until then).
            let presence = match legacy {
                true => None,
                false => Box::pin(state.presence.snapshot(&state.bus, room)).await,
            };
            let room_epoch = plan.epoch.clone();
            let joined = |last_id| {
                if legacy {
                    return Vec::new();
                }
                let joined = ServerFrame::Joined {
                    room: room.to_string(),
                    last_id,
                    recovered,
                    epoch: room_epoch.as_deref().map(str::to_owned),
                };
                let mut frames = vec![frame::text(joined.to_json().as_bytes())];
                frames.extend(presence.as_deref().map(frame::text));
                frames
            };
            let go = state
                .hub
                .go_live(room, self.conn, plan.last_id, plan.epoch.clone(), joined);
            match go {
                GoLive::Live(last_id) => {
                    debug!(%room, last_id, recovered, "joined");
                    if let Some(entry) = self.rooms.iter_mut().find(|(r, _)| *r == *room) {
                        entry.1 = true;
                    }
                    return true;
                }
                GoLive::Retry => {
                    // Continue from what was just replayed, in the epoch it came from.
                    since = Some(plan.last_id);
                    epoch = plan.epoch.as_deref().map(str::to_owned);
                    first_pass = false;
                }
                GoLive::Gone => return false,
            }
        }
    }

    /// Undoes a join the bus could not serve (the detail was logged, not told).
    async fn abort_join(&mut self, room: &RoomName, reference: Option<String>) {
        self.rooms.retain(|(r, _)| r != room);
        if let Some(release) = self.state.hub.leave(room, self.conn, &self.state.bus) {
            release.await;
        }
        let err = FrameError::new(
            ErrorCode::Unavailable,
            format!("cannot join {room}: the message bus is unavailable, try again"),
        );
        self.refuse(err.with_ref(reference)).await;
    }
}

/// What a join replays, given the client's `since` (and its epoch) and what the bus
/// returned.
#[derive(Debug, PartialEq, Eq)]
struct ReplayPlan {
    messages: Vec<Msg>,
    /// Whether the replay continues the client's view without a hole.
    recovered: bool,
    /// The room's last id when history was read.
    last_id: u64,
    epoch: Option<Epoch>,
}

impl ReplayPlan {
    fn new(since: Option<u64>, client_epoch: Option<&str>, history: History) -> Self {
        let History {
            top,
            epoch,
            messages,
        } = history;
        let same_epoch = client_epoch.is_none() || client_epoch == epoch.as_deref();
        let recovered = match since {
            None => true,
            Some(_) if !same_epoch => false,
            Some(s) if s > top => false,
            Some(s) => match messages.first() {
                Some(first) => first.id <= s + 1,
                None => s == top,
            },
        };
        let messages = match since {
            Some(s) if recovered => messages.into_iter().filter(|m| m.id > s).collect(),
            _ => messages,
        };
        ReplayPlan {
            messages,
            recovered,
            last_id: top,
            epoch,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(top: u64, ids: &[u64]) -> History {
        History {
            top,
            epoch: Some(Epoch::from("e1")),
            messages: ids
                .iter()
                .map(|&id| Msg {
                    id,
                    json: id.to_string().into(),
                })
                .collect(),
        }
    }

    fn plan(since: Option<u64>, history: History) -> (Vec<u64>, bool, u64) {
        let p = ReplayPlan::new(since, None, history);
        (
            p.messages.iter().map(|m| m.id).collect(),
            p.recovered,
            p.last_id,
        )
    }

    #[test]
    fn replay_plans() {
        let retained = || h(10, &(6..=10).collect::<Vec<_>>());
        // empty room
        assert_eq!(plan(None, h(0, &[])), (vec![], true, 0));
        assert_eq!(plan(Some(0), h(0, &[])), (vec![], true, 0));
        // fresh join replays everything retained
        assert_eq!(plan(None, retained()), (vec![6, 7, 8, 9, 10], true, 10));
        // resume within history
        assert_eq!(
            plan(Some(8), h(10, &(9..=10).collect::<Vec<_>>())),
            (vec![9, 10], true, 10)
        );
        assert_eq!(plan(Some(8), retained()), (vec![9, 10], true, 10));
        assert_eq!(plan(Some(5), retained()), (vec![6, 7, 8, 9, 10], true, 10));
        assert_eq!(plan(Some(10), h(10, &[])), (vec![], true, 10));
        // too old: some messages are gone
        assert_eq!(plan(Some(4), retained()), (vec![6, 7, 8, 9, 10], false, 10));
        // from the future (the room was reset)
        assert_eq!(
            plan(Some(12), retained()),
            (vec![6, 7, 8, 9, 10], false, 10)
        );
        assert_eq!(plan(Some(3), h(0, &[])), (vec![], false, 0));
    }

    #[test]
    fn a_since_from_another_epoch_is_not_recovered() {
        let history = || h(10, &(6..=10).collect::<Vec<_>>());
        let same = ReplayPlan::new(Some(8), Some("e1"), history());
        assert_eq!((same.messages.len(), same.recovered), (2, true));
        let other = ReplayPlan::new(Some(8), Some("e0"), history());
        assert_eq!((other.messages.len(), other.recovered), (5, false));
        assert_eq!(other.epoch.as_deref(), Some("e1"));
    }
}
