//! [`EtcdPayload`]: how a session's payload is kept in etcd.

/// A payload that [`EtcdStore`](super::EtcdStore) can keep in etcd: it is written with the
/// session and read back by every controller.
///
/// Implemented for `()`, [`String`] and `Vec<u8>`; implement it for your own
/// payload with the encoding of your choice.
///
/// # Example
///
/// ```
/// use session_lifecycle::etcd::EtcdPayload;
///
/// /// The client's name and its service.
/// #[derive(Debug, PartialEq)]
/// struct Client {
///     name: String,
///     service: u32,
/// }
///
/// impl EtcdPayload for Client {
///     fn encode(&self, out: &mut Vec<u8>) {
///         out.extend_from_slice(&self.service.to_be_bytes());
///         out.extend_from_slice(self.name.as_bytes());
///     }
///
///     fn decode(bytes: &[u8]) -> Result<Self, Box<dyn std::error::Error + Send + Sync>> {
///         let (service, name) = bytes.split_at_checked(4).ok_or("payload too short")?;
///         Ok(Client {
///             name: String::from_utf8(name.to_vec())?,
///             service: u32::from_be_bytes(service.try_into()?),
///         })
///     }
/// }
///
/// let client = Client { name: "alice".into(), service: 7 };
/// let mut bytes = Vec::new();
/// client.encode(&mut bytes);
/// assert_eq!(Client::decode(&bytes).unwrap(), client);
/// assert!(Client::decode(&[1]).is_err());
/// ```
pub trait EtcdPayload: Sized + Send + Sync + 'static {
    /// Appends the payload's bytes to `out`.
    fn encode(&self, out: &mut Vec<u8>);

    /// Reads a payload back from what [`encode`](Self::encode) wrote.
    ///
    /// # Errors
    ///
    /// Whatever makes `bytes` unreadable; the store reports it as a backend
    /// error naming the key.
    fn decode(bytes: &[u8]) -> Result<Self, Box<dyn std::error::Error + Send + Sync>>;
}

impl EtcdPayload for () {
    fn encode(&self, _out: &mut Vec<u8>) {}

    fn decode(bytes: &[u8]) -> Result<Self, Box<dyn std::error::Error + Send + Sync>> {
        if bytes.is_empty() {
            Ok(())
        } else {
            Err(format!("{} unexpected payload bytes", bytes.len()).into())
        }
    }
}

impl EtcdPayload for String {
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self.as_bytes());
    }

    fn decode(bytes: &[u8]) -> Result<Self, Box<dyn std::error::Error + Send + Sync>> {
        Ok(String::from_utf8(bytes.to_vec())?)
    }
}

impl EtcdPayload for Vec<u8> {
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self);
    }

    fn decode(bytes: &[u8]) -> Result<Self, Box<dyn std::error::Error + Send + Sync>> {
        Ok(bytes.to_vec())
    }
}
